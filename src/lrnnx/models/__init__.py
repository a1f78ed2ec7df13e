"""All lrnnx models: :mod:`lrnnx.models.lti` (time-invariant) and :mod:`lrnnx.models.ltv` (time-varying)."""
