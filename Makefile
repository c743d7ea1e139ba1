# Every install step lives here: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench protos migrate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/apikeyd migrate
	$(BIN)/apikeyd serve

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run

migrate: $(STAMP)
	$(BIN)/apikeyd migrate

# The stubs are committed; regenerate them after editing protos/.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		-I$$($(BIN)/python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))') \
		-I$$($(BIN)/python -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))') \
		--python_out=src --pyi_out=src --grpc_python_out=src protos/apikeyd/v1/api_keys.proto
	touch src/apikeyd/v1/__init__.py

clean:
	rm -rf $(VENV) build src/*.egg-info
