# Every install step lives here: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# protobuf's well-known types and googleapis' google/api, from the installed packages
PROTO_INCLUDES = -I$$($(BIN)/python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))') \
	-I$$($(BIN)/python -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')

.PHONY: run test container-test lint bench fuzz protos migrate docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/apikeyd migrate
	$(BIN)/apikeyd serve

test: $(STAMP)
	@echo "make test: the whole suite on SQLite, and on PostgreSQL when it answers; about 13 minutes on 2 cores"
	$(BIN)/pytest

# The image built and smoke-tested in a Docker daemon of its own (tests/test_container_build.py): Debian's
# docker.io, and mmdebstrap to make the base when no registry answers, installed here when missing (as root);
# without them the test is skipped. About 3 minutes from nothing, less once .venv/container-cache holds the base.
container-test: $(STAMP)
	@{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] && command -v mmdebstrap >/dev/null; } || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io mmdebstrap >/dev/null; } || \
		echo "docker.io cannot be installed here: skipped: no container engine"
	$(BIN)/pytest -m container tests/test_container_build.py

# buf cannot fetch googleapis here, so it lints an image that protoc builds with the imports included.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench fuzz examples
	$(BIN)/mypy src examples
	$(BIN)/python -m grpc_tools.protoc -Iprotos $(PROTO_INCLUDES) --include_imports --include_source_info \
		--descriptor_set_out=$(VENV)/apikeyd.binpb protos/apikeyd/v1/api_keys.proto
	$(BIN)/buf lint $(VENV)/apikeyd.binpb --path apikeyd/v1/api_keys.proto --config buf.yaml

# wrk drives the Envoy section; Debian's package, installed here when missing (as root), else that section is skipped.
# All of it takes 10 to 12 minutes; SECTION="core credits" runs only those (an unknown name lists them all).
bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q wrk >/dev/null; } || echo "no wrk, and it cannot be installed here: the Envoy section is skipped"
	$(BIN)/python -m bench.run $(SECTION)

# Coverage-guided fuzzing (atheris) of the pure parsers, fuzz/fuzz_*.py, sharing FUZZ_SECONDS between them.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.run $(FUZZ_SECONDS)

# docs/ as a site in .venv/site (mkdocs-material, strict: a broken link or a page left out fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

migrate: $(STAMP)
	$(BIN)/apikeyd migrate

# The stubs are committed; regenerate them after editing protos/. So is the descriptor set that Envoy's
# gRPC-JSON transcoder reads at run time (deploy/envoy/rest.yaml): with its imports, as Envoy has no others.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos $(PROTO_INCLUDES) --python_out=src --pyi_out=src --grpc_python_out=src \
		--include_imports --descriptor_set_out=deploy/envoy/apikeyd.pb protos/apikeyd/v1/api_keys.proto
	touch src/apikeyd/v1/__init__.py

clean:
	rm -rf $(VENV) build src/*.egg-info
