"""Version 1 of the nmtserve gRPC API: translator.proto and its generated stubs (`make proto`)."""

# The call metadata key of a request id: a client may send one, the server logs the call under it (or under one of its
# own) and returns it in the answer and in an error's trailing metadata. Metadata is not part of the .proto.
REQUEST_ID_KEY = "x-request-id"
