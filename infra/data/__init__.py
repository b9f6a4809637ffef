"""Video/image data: WebDataset shards in the SSVAE layout, read by random access into resumable batches.

Import from the modules (kept out of this file so ``import infra.data`` stays cheap):

- ``infra.data.config``: ``DataConfig``, ``BucketConfig``
- ``infra.data.dataset``: ``build_loader(cfg, rank, world_size, seed, start_batch)``, ``ShardBatchDataset``
- ``infra.data.eval_clips``: ``load_eval_clips(roots, n, ...)``
- ``infra.data.skips``: ``SkipTotals`` (adds up the skip counts batches carry)
- ``infra.data.shard_writer``: ``ShardWriter``, ``encode_image`` (mp4s: ``infra.video_io.encode_mp4``)
"""
