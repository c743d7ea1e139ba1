"""The domain: key format, scopes, key records and their rules. Pure code: no I/O, gRPC or SQL."""
