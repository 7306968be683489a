"""The errors a fit raises after it started: each keeps the work done so far in ``.result``."""


class FitError(RuntimeError):
    """A fit stopped on an error at ``step``; ``result`` holds its last good state."""

    def __init__(self, message, *, step, result):
        super().__init__(message)
        self.step, self.result = step, result


class DivergenceError(FitError, FloatingPointError):
    """The loss became NaN or infinite at ``step``; ``site`` names the culprit if found."""

    def __init__(self, message, *, step, last_elbo, site, result):
        super().__init__(message, step=step, result=result)
        self.last_elbo, self.site = last_elbo, site
