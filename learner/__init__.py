"""The learner role: one-pass (or fused, colocated) REFINE updates from the service's streams,
checkpoints for exact resume, and versioned weight publishing.

- `learner.learner.Learner`: the role (a Ray actor in the service): `setup()`, `run()`;
- `learner.update`: one update from a ScoredBatch or a document batch;
- `learner.checkpoint`: checkpoints written atomically, with the service's state;
- `learner.data_parallel` / `learner.replica`: several learner ranks (service.num_learners) over
  torch.distributed, ranks 1..R-1 as `LearnerReplica` actors.
"""
