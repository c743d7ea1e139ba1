"""The gRPC servicers: protobuf <-> domain, and domain errors -> status codes."""
