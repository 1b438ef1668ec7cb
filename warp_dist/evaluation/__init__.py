"""Evaluation: the sharded evaluator (`evaluator`), its metrics (`metrics`) and statistics (`stats`), the second judge
(`judge`), the cache of finished evaluations (`evalcache`) and the run report (`report`)."""
