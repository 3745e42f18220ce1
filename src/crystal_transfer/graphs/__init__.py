"""Crystal graphs: neighbour lists, the shard stage, the shard format, the dataset and batch."""
