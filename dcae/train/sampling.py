"""Training batches that are the same whatever the number of processes, and after a resume.

Each sample's crop and flip is seeded by (seed, epoch, index), not by a process's RNG state, and each rank
reads its `DistributedSampler` share of an endless run of epochs from any position.
"""
import itertools

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class SeededSamples(Dataset):
    """Wraps a dataset whose ``__getitem__`` draws from torch's global CPU RNG: item ``epoch * n + i`` is
    ``dataset[i]`` drawn under the seed (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, virtual_index: int):
        epoch, index = divmod(virtual_index, len(self.dataset))
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a (costly) seed of every CUDA device
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            return self.dataset[index]


class EndlessDistributedSampler(Sampler):
    """Rank ``rank``'s share of epoch after epoch of `DistributedSampler` orders, as virtual indices
    ``epoch * n + i`` (see `SeededSamples`), starting after the first ``start`` samples of this rank."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, start: int = 0):
        self.n = len(dataset)
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        if len(self.sampler) == 0:
            raise ValueError(f"{self.n} training images cannot be shared by {num_replicas} processes")
        self.start = start

    def __iter__(self):
        epoch, skip = divmod(self.start, len(self.sampler))
        for epoch in itertools.count(epoch):
            self.sampler.set_epoch(epoch)
            for index in itertools.islice(self.sampler, skip, None):
                yield epoch * self.n + index
            skip = 0
