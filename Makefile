# submitd: `make run` starts the whole stack on this machine, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PROTOS := $(wildcard proto/submitd/v1/*.proto)
GEN    := services/common/src/submitd
SERVICES := common frontend policy rewriter relay ctl devkit

.PHONY: all install proto run test bench bench-deps bench-nats-memory soak profile fuzz fault-queue constraints clean images image-test scale-test
all: install

# One virtualenv for the workspace; every service installed editable into it.
$(VENV)/.installed: constraints.txt pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml) $(PROTOS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q -c constraints.txt grpcio-tools
	$(MAKE) proto
	$(PIP) install -q -c constraints.txt $(foreach s,$(SERVICES),-e ./services/$(s)) -e '.[test]'
	touch $@

# sslyze (the TLS scanner the tests run against the frontend) pins an older cryptography than
# the services use: it lives in a virtualenv of its own and runs as a separate process.
SSLYZE := $(VENV)/sslyze/bin/sslyze
$(SSLYZE): constraints-sslyze.txt
	mkdir -p $(VENV)
	test -x $(VENV)/sslyze/bin/python || $(PYTHON) -m venv $(VENV)/sslyze
	$(VENV)/sslyze/bin/python -m pip install -q --disable-pip-version-check -c constraints-sslyze.txt sslyze
	touch $@

install: $(VENV)/.installed $(SSLYZE)

# Generated code is never edited: it is rebuilt from proto/ by this target.
proto: $(GEN)/v1/.stamp
$(GEN)/v1/.stamp: $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services/common/src \
	  --pyi_out=services/common/src --grpc_python_out=services/common/src $(PROTOS)
	touch $(GEN)/__init__.py $(GEN)/v1/__init__.py $@

run: install
	$(PY) scripts/run_local.py

# Six workers on two cores (most of a test is waiting on a server: 3 workers took 198 s, 4 took
# 178 s, 6 took 157 s and 8 took 165 s in one sitting); each test goes to whichever worker is
# free, the long ones first (the dev kit's plugin orders them).
PYTEST_ARGS ?= -n 6 --dist load
# The two virtualenvs install side by side (on a fresh machine that is most of a minute each).
test:
	$(MAKE) -j2 install
	$(PY) -m pytest $(PYTEST_ARGS)

# The dialog fuzzer's long round (make test runs 60 sessions of it): FUZZ_SEED=7 make fuzz
FUZZ_SESSIONS ?= 2000
fuzz: install
	FUZZ_SESSIONS=$(FUZZ_SESSIONS) $(PY) -m pytest -s --timeout=0 tests/test_fuzz.py

# nats-server killed again and again under load; what the queue holds afterwards (stranded entries,
# withdrawn publishes): scripts/queue_faults.py. FAULT_ARGS="--observe --rounds 20" to see the
# divergence with the relay's recovery off.
fault-queue: install
	$(PY) scripts/queue_faults.py $(FAULT_ARGS)

bench: install bench-deps
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Flame graphs of each service under load (py-spy into .venv: a tool, not a dependency).
PROFILE_ARGS ?=
profile: install bench-deps
	@test -x .venv/bin/py-spy || .venv/bin/pip install -q py-spy
	$(PY) scripts/profile.py $(PROFILE_ARGS)

# A soak: the whole stack under steady load, every process's memory each minute (issue 29).
SOAK_MINUTES ?= 60
SOAK_RATE ?= 100
soak: install bench-deps
	$(PY) scripts/soak.py --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE) $(SOAK_ARGS)

# NATS memory bounded alone (issue 29): 60 x 24 MB at once, nats-server under a 1 GiB cgroup.
bench-nats-memory: install bench-deps
	$(PY) scripts/bench.py --only large-bounded $(BENCH_ARGS)

# What only the bench needs (make test needs neither): Postfix (smtp-source, smtp-sink and the
# peer itself) from Debian, and Haraka from npm into build/haraka (git-ignored; --no-package-lock:
# no lock file, nothing written outside that directory but npm's cache). An npm that fails is no
# error: the bench says why (build/haraka/install.log) and runs without Haraka.
HARAKA_VERSION ?= 3.3.4
HARAKA := build/haraka/node_modules/.bin/haraka
bench-deps: $(HARAKA)
	@command -v smtp-source >/dev/null 2>&1 || test -x /usr/sbin/smtp-source || { \
	  echo "postfix missing: installing it (no configuration; the bench runs private instances)"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null; }
$(HARAKA):
	mkdir -p build/haraka
	@if ! command -v npm >/dev/null 2>&1; then echo "npm not found" > build/haraka/install.log; \
	elif cd build/haraka && npm install --no-save --no-package-lock --no-audit --no-fund \
	    Haraka@$(HARAKA_VERSION) > install.log 2>&1; then echo "Haraka $(HARAKA_VERSION) in build/haraka"; \
	else echo "npm install Haraka failed (build/haraka/install.log); the bench runs without it"; fi

# Scale-out and quorum with processes on loopback (scripts/scale_test.py): a 3-node JetStream
# under load with nodes killed, frontends behind HAProxy, scaling; prints what clients saw.
scale-test: install
	$(PY) scripts/scale_test.py $(SCALE_ARGS)

# One image per service (see Dockerfile): IMAGE_PREFIX=registry/path/ TAG=1.2.3 make images
IMAGE_PREFIX ?=
TAG ?= dev
# docker, podman or buildah, whichever works here (scripts/images.sh).
images:
	IMAGE_PREFIX=$(IMAGE_PREFIX) TAG=$(TAG) scripts/images.sh

# The images built from a locally made Debian base and started as the chart's pod specs say,
# then a message through them (scripts/image_test.py; needs podman and mmdebstrap).
image-test: install
	$(PY) scripts/image_test.py

# Pins without registry addresses: what `pip freeze` sees, minus our own packages.
constraints:
	$(PIP) freeze --exclude-editable | grep -v '^-e ' | grep -v '^submitd' > constraints.txt

clean:
	rm -rf $(VENV) $(GEN) var
