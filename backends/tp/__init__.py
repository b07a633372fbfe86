"""Tensor parallelism over ``torch.distributed``: one model split across N ranks.

``executor.TPBackend`` (the driver, rank 0, in the engine process) implements
the ``Backend`` interface; ``worker`` is the process of every other rank;
``rank.RankRunner`` runs one shard (the cpu backend plus the collectives);
``sharding`` says which slice of each weight a rank holds; ``comm`` holds
the collectives and the rendezvous; ``launch`` reads torchrun's variables
(torch-free, for the command line). ``backends.registry.create_backend``
picks it (``executor.create``) for ``tensor_parallel_size`` > 1.
"""
