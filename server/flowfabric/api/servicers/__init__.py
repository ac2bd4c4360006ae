"""gRPC servicers: decode the request, call the engine or one function, encode the response."""
