"""The engine: buckets assigned once, a plan with a route per bucket, transactional state and
the step lifecycle.  See docs/design.md, "The engine"."""
