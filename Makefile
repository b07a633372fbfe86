# The two commands of a fresh machine (see README.md).
.PHONY: setup serve test proto image image-test

setup:
	bash scripts/setup.sh

serve: setup
	.venv/bin/pagedgen serve $(ARGS)

test: setup
	bash scripts/test.sh

proto:
	bash scripts/gen_proto.sh

# The CPU container image (Containerfile) with buildah, podman or docker: IMAGE=pagedgen:cpu,
# BASE=..., CONTAINERFILE=Containerfile.cuda, IMAGE_BUILD_ARGS="--build-arg ...".
image:
	bash scripts/image_test.sh build

# Build the image here on a Debian base and check it from outside (root, Debian; what CI runs).
image-test: setup
	bash scripts/image_test.sh test
