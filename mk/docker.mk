# Container images (dockerfiles/) and the offline wheelhouse they are built from.
# Included by the Makefile; every variable can be overridden on the command line.
#
#   make wheelhouse                        third-party wheels (refetched only when pyproject.toml's
#                                          dependencies change) + the project wheel (always)
#   make images                            slmops-train, slmops-build, slmops-serve:$(VERSION)
#   make images OFFLINE=1                  same, from a locally built base (no image pull at all)
#   make images BUNDLE=dist/bundles/cpu    also slmops-serve:$(VERSION)-cpu with the bundle baked in
#   make image-serve                       one image (image-train, image-build, image-serve)
#   make base-image                        the local base: mmdebstrap bookworm + python3 (3.11)
#   make image-sizes                       sizes of the images
#   make images ARCH=arm64 [OFFLINE=1]     slmops-serve:$(VERSION)-arm64 only (see below)
#   make images ARCH=amd64,arm64           the three images for amd64 + the arm64 serve image
#   make images ARCH=amd64,arm64 REGISTRY=host:5000
#                                          ... then push both serve images and a multi-arch
#                                          manifest list host:5000/slmops-serve:$(VERSION)
#
# Builds use BuildKit (RUN --mount) with --network none: everything comes from wheelhouse/.
#
# Architectures (ARCH, comma-separated; default this machine's): the serve image is built for each
# (tagged slmops-serve:$(VERSION)-<arch>; the one of this machine's arch also plain
# slmops-serve:$(VERSION)), from wheelhouse/deps-<arch> and, with OFFLINE=1, the base
# slmops-base:bookworm-<arch> made by mmdebstrap --arch (qemu-user emulation on an x86 host:
# apt-get install qemu-user-static binfmt-support arch-test). The train and build images stay on
# this machine's architecture: bundles are built on the build host for any target (`slmops build
# --target cpu-arm64` runs on x86), and an edge device only serves; an emulated arm64 torch image
# would take hours here for no use.

ifndef VERSION
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
endif
# A client that can run BuildKit builds: `docker` when it has buildx (or is a classic client),
# else Debian's 20.10 client at /usr/bin/docker (its built-in BuildKit supports RUN --mount).
ifndef DOCKER
DOCKER := $(shell if docker buildx version >/dev/null 2>&1; then echo docker; \
	elif [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else echo docker; fi)
endif
IMAGE_PREFIX ?= slmops-
LOCAL_BASE   ?= slmops-base:bookworm
comma := ,
# HOST_ARCH: this machine in Docker's names (uname -m says x86_64 / aarch64). ARCH is expanded once
# here, so a later HOST_ARCH in an including Makefile cannot change it.
HOST_ARCH    := $(shell uname -m | sed -e 's/x86_64/amd64/' -e 's/aarch64/arm64/')
ARCH         ?= $(HOST_ARCH)
ARCH         := $(ARCH)
ARCHES       := $(subst $(comma), ,$(ARCH))
FOREIGN_ARCHES := $(filter-out $(HOST_ARCH),$(ARCHES))
REGISTRY     ?=
# OFFLINE=1: build the local base first and use it; OFFLINE=0: python:3.11-slim-bookworm (a pull);
# unset: the local base when this engine already has it (an earlier OFFLINE=1 build made it), so a
# later `make bundle IN_DOCKER=1` or `make image-serve` does not try to pull. Recursive (=): the
# engine is asked only when a recipe needs the name.
PULL_BASE    := python:3.11-slim-bookworm
OFFLINE      ?=
have_base     = $(shell $(DOCKER) image inspect $(1) >/dev/null 2>&1 && echo $(1))
ifeq ($(OFFLINE),1)
BASE_IMAGE   ?= $(LOCAL_BASE)
BASE_PREREQ  := base-image
else ifeq ($(OFFLINE),0)
BASE_IMAGE   ?= $(PULL_BASE)
BASE_PREREQ  :=
else
BASE_IMAGE   ?= $(or $(call have_base,$(LOCAL_BASE)),$(PULL_BASE))
BASE_PREREQ  :=
endif
# The base of a foreign-arch serve image (ARCH=arm64): the same rule with LOCAL_BASE-<arch>.
foreign_base  = $(if $(filter 1,$(OFFLINE)),$(LOCAL_BASE)-$(1),$(if $(filter 0,$(OFFLINE)),$(PULL_BASE),$(or $(call have_base,$(LOCAL_BASE)-$(1)),$(PULL_BASE))))
DOCKER_BUILD_FLAGS ?=
WHEELHOUSE_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3.11)
BUNDLE       ?=
BUNDLE_TAG   ?= $(IMAGE_PREFIX)serve:$(VERSION)-$(notdir $(patsubst %/,%,$(BUNDLE)))
STAGE_IMAGES := train build serve

.PHONY: wheelhouse base-image images image-sizes image-bundle push-images $(addprefix image-,$(STAGE_IMAGES))

wheelhouse:
	@for a in $(ARCHES); do case "$$a" in amd64|arm64) ;; *) echo "ARCH=$(ARCH): '$$a' is not amd64 or arm64 (e.g. ARCH=amd64,arm64)" >&2; exit 2 ;; esac; done
	PY=$(WHEELHOUSE_PY) ARCHES=$(ARCH) scripts/make_wheelhouse.sh

base-image:
	ARCH=$(HOST_ARCH) DOCKER=$(DOCKER) scripts/make_base_image.sh $(LOCAL_BASE)

base-image-%:
	ARCH=$* DOCKER=$(DOCKER) scripts/make_base_image.sh $(LOCAL_BASE)-$*

# The serve image for a foreign architecture (this machine's is image-serve).
image-serve-%: wheelhouse $(if $(filter 1,$(OFFLINE)),base-image-%)
	@start=$$(date +%s); \
	DOCKER_BUILDKIT=1 $(DOCKER) build --network none --platform linux/$* $(DOCKER_BUILD_FLAGS) \
		--build-arg BASE_IMAGE=$(call foreign_base,$*) --build-arg VERSION=$(VERSION) \
		-f dockerfiles/serve.Dockerfile -t $(IMAGE_PREFIX)serve:$(VERSION)-$* . && \
	echo "$(IMAGE_PREFIX)serve:$(VERSION)-$* ($*): $$(( $$($(DOCKER) image inspect -f '{{.Size}}' $(IMAGE_PREFIX)serve:$(VERSION)-$*) / 1000000 )) MB, built in $$(( $$(date +%s) - start ))s"

# Push each serve image and a manifest list REGISTRY/slmops-serve:VERSION over them (docker manifest).
push-images:
	@test -n "$(REGISTRY)" || { echo "REGISTRY=host:port is missing, e.g. make push-images REGISTRY=127.0.0.1:5000" >&2; exit 2; }
	DOCKER=$(DOCKER) scripts/push_images.sh $(REGISTRY) $(IMAGE_PREFIX)serve:$(VERSION) $(ARCHES)

$(addprefix image-,$(STAGE_IMAGES)): image-%: wheelhouse $(BASE_PREREQ)
	@start=$$(date +%s); \
	DOCKER_BUILDKIT=1 $(DOCKER) build --network none $(DOCKER_BUILD_FLAGS) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
		-f dockerfiles/$*.Dockerfile -t $(IMAGE_PREFIX)$*:$(VERSION) . && \
	$(DOCKER) tag $(IMAGE_PREFIX)$*:$(VERSION) $(IMAGE_PREFIX)$*:$(VERSION)-$(HOST_ARCH) && \
	echo "$(IMAGE_PREFIX)$*:$(VERSION) ($(HOST_ARCH)): $$(( $$($(DOCKER) image inspect -f '{{.Size}}' $(IMAGE_PREFIX)$*:$(VERSION)) / 1000000 )) MB, built in $$(( $$(date +%s) - start ))s"

# The serve image with BUNDLE copied to /bundle (context = the bundle folder).
image-bundle: image-serve
	@test -f "$(BUNDLE)/bundle.json" || { echo "BUNDLE=$(BUNDLE): no bundle.json there; pass a bundle folder (make bundle builds dist/bundles/cpu)" >&2; exit 2; }
	DOCKER_BUILDKIT=1 $(DOCKER) build --network none $(DOCKER_BUILD_FLAGS) \
		--build-arg SERVE_IMAGE=$(IMAGE_PREFIX)serve:$(VERSION) \
		--build-arg BUNDLE_SHA256=$$(sha256sum "$(BUNDLE)/bundle.json" | cut -d' ' -f1) \
		--build-arg BUNDLE_NAME=$(notdir $(patsubst %/,%,$(BUNDLE))) \
		-f dockerfiles/bundle.Dockerfile -t $(BUNDLE_TAG) "$(BUNDLE)"

images: $(if $(filter $(HOST_ARCH),$(ARCHES)),$(addprefix image-,$(STAGE_IMAGES)) $(if $(BUNDLE),image-bundle)) \
	$(addprefix image-serve-,$(FOREIGN_ARCHES)) image-sizes $(if $(REGISTRY),push-images)

image-sizes:
	@$(DOCKER) image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^$(IMAGE_PREFIX)(train|build|serve):' || true

# `make bundle IN_DOCKER=1`: the Makefile runs train and build through these commands, in the
# slmops-train / slmops-build images, on the repository mounted at /work (as your uid, so the
# files are yours) with .cache/slmops as the model cache.
IN_DOCKER ?= 0
DOCKER_RUN_FLAGS ?= --rm --init -u $$(id -u):$$(id -g) -v "$(CURDIR):/work" -v "$(CURDIR)/.cache/slmops:/cache"
ifeq ($(IN_DOCKER),1)
SLMOPS_TRAIN_CMD = mkdir -p .cache/slmops && $(DOCKER) run $(DOCKER_RUN_FLAGS) $(IMAGE_PREFIX)train:$(VERSION)
SLMOPS_BUILD_CMD = mkdir -p .cache/slmops && $(DOCKER) run $(DOCKER_RUN_FLAGS) $(IMAGE_PREFIX)build:$(VERSION)
STAGE_PREREQ = image-train image-build
else
SLMOPS_TRAIN_CMD = $(SLMOPS)
SLMOPS_BUILD_CMD = $(SLMOPS)
STAGE_PREREQ = install
endif
