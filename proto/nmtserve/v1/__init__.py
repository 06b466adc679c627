"""Version 1 of the nmtserve gRPC API: translator.proto and its generated stubs (`make proto`)."""
