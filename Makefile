# The two commands a new user needs: `make test` and `make demo`.
# Each installs .venv first (Install/install.sh) when it is missing or stale.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.crfcore-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Install/install.sh $(wildcard package.json)
	bash Install/install.sh

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash example/run_pipeline.sh

clean:
	rm -rf example/out bench/out .pytest_cache
