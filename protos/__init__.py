"""The public gRPC API (``recsys.v1``): the .proto files and their generated Python modules."""
