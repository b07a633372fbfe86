"""Tensor parallelism over ``torch.distributed``: one model split across N ranks.

``executor.TPBackend`` (the driver, rank 0, in the engine process) implements
the ``Backend`` protocol; ``worker`` is the process of every other rank;
``rank.RankRunner`` runs one shard (the cpu backend plus the collectives);
``sharding`` says which slice of each weight a rank holds; ``comm`` holds
the collectives and the rendezvous. ``create_backend(...,
tensor_parallel_size=N)`` picks it for N > 1.
"""
