"""Running and calling a server: TorchServe control, its keys, the REST and gRPC clients, the batch job."""
