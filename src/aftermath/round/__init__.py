"""What both sides of a round share: the replica (weights + update rule + codec, one builder) and the protocol
(every request, answer, the state snapshot, the summary and the metrics record, as pydantic models).
`coordinator/` and `client/` both build on this room and never import each other."""
