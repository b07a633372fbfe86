# The two commands of a fresh machine (see README.md).
.PHONY: setup serve test proto

setup:
	bash scripts/setup.sh

serve: setup
	.venv/bin/pagedgen serve $(ARGS)

test: setup
	bash scripts/test.sh

proto:
	bash scripts/gen_proto.sh
