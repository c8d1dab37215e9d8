"""Errors of the core that say what kind of failure they are."""


class ContractError(RuntimeError):
    """The code broke its own contract (a table-level failure of a validation model, a query
    that does not fit its tables): the same inputs fail the same way, so it is not retried."""
