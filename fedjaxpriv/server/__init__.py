"""Server side: client sampling, aggregation and server optimizers."""

from fedjaxpriv.server.optimizers import server_optimizer
from fedjaxpriv.server.sampling import Cohort, max_cohort_size, sample_cohort

__all__ = ["Cohort", "max_cohort_size", "sample_cohort", "server_optimizer"]
