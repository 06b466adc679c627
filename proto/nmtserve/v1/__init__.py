"""Version 1 of the nmtserve gRPC API: translator.proto and its generated stubs (`make proto`)."""

import re

# The call metadata key of a request id: a client may send one, the server logs the call under it (or under one of its
# own) and returns it in the answer and in an error's trailing metadata. Metadata is not part of the .proto.
REQUEST_ID_KEY = "x-request-id"
# The ids it logs as sent: it logs a call with any other under one of its own, since a client's text in a log line
# could forge its fields, and the caller could not find the call by that id.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
