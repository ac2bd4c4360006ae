"""gRPC servicers: decode the request, call one function or read, encode the response."""
