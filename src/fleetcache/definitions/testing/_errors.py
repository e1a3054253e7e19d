"""The error of the simulated prerender service and its clients."""

from fleetcache.definitions.errors import DefinitionsError


class SimulatedServerError(DefinitionsError):
    """The simulated prerender server could not be started or refused a control request."""
