"""gRPC transport: protobuf ↔ domain conversion, the servicer, the server around it."""
