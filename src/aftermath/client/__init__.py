"""The client: the replica of one tier (model + optimizer), the transport to the coordinator, the round loop."""
