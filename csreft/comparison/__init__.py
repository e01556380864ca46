"""The comparison behind `csreft compare` and `csreft demo`: methods and variants, the runner,
the report."""
