"""gradindex gRPC server, client and command line."""
