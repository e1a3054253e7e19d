"""A simulated prerender service speaking the real protocol, to test the definitions domain.

Import it from tests and tools: :mod:`fleetcache.definitions` never imports it (nor aiohttp).
"""

from fleetcache.definitions.testing._control import SimulatedPrerenderControl
from fleetcache.definitions.testing._errors import SimulatedServerError
from fleetcache.definitions.testing._graph import ModuleSpec, graph_from_json, graph_to_json
from fleetcache.definitions.testing._process import start_in_subprocess, stop_subprocess
from fleetcache.definitions.testing._server import RecordedRequest, SimulatedPrerenderServer

__all__ = [
    "ModuleSpec",
    "RecordedRequest",
    "SimulatedPrerenderControl",
    "SimulatedPrerenderServer",
    "SimulatedServerError",
    "graph_from_json",
    "graph_to_json",
    "start_in_subprocess",
    "stop_subprocess",
]
