"""Protocol ids and the limits every peer enforces on the messages of each.

Version 2 of every protocol: typed messages (``wire/rpc.py``, ``wire/inference.py``, ``wire/records.py``,
``wire/speedtest.py``) and a frame limit per protocol. Peers speaking version 1 cannot negotiate with version 2.
"""

from jupyter_swarm.p2p.framing import DEFAULT_MAX_FRAME_BYTES  # noqa: F401 - the cap of every protocol
from jupyter_swarm.p2p.peer_limits import StreamQuota

RPC = "/jupyter-swarm/rpc/2.0.0"  # forward, backward, info: one request -> one reply, repeatable on a stream
INFERENCE = "/jupyter-swarm/inference/2.0.0"  # open -> opened, then step -> output ... until the stream closes
PUSH = "/jupyter-swarm/push/2.0.0"  # server -> next server: a session's step output, one-way, repeatable
RECORDS = "/jupyter-swarm/records/2.0.0"  # store -> stored, get -> found: one request per stream
SPEEDTEST = "/jupyter-swarm/speedtest/2.0.0"  # one payload -> an acknowledgement: measures a link's bandwidth

MAX_BATCH_TOKENS = 16_384  # batch * sequence length accepted in one forward/backward/step
MAX_BATCH_SIZE = 256
RELAY_MAX_TOKENS = 64  # batch x new tokens of a relayed step; bigger steps go server by server (less to carry)
MAX_RELAY_SPANS = 32  # servers in a relayed chain: a relayed step carries one input per server before the last

SPEEDTEST_MAX_BYTES = 8 * 2**20
RECORDS_MAX_REQUEST_BYTES = 1 * 2**20  # what a record server reads from anyone: small
RECORDS_MAX_REPLY_BYTES = 16 * 2**20  # what a reader takes from a replica: every server's record of many blocks
FRAME_OVERHEAD_BYTES = 64 * 1024  # msgpack framing and the small fields around a message's tensors

# Inbound streams each protocol takes at once, from one peer and from everyone. A client keeps at most
# RPC_MAX_IN_FLIGHT requests (so streams) going to one server; a server pushes one stream per relayed session.
RPC_MAX_IN_FLIGHT = 8
RPC_STREAMS = StreamQuota(per_peer=2 * RPC_MAX_IN_FLIGHT, total=1024)
INFERENCE_STREAMS = StreamQuota(per_peer=256, total=4096)  # sessions: a server's own per-peer limit is lower
PUSH_STREAMS = StreamQuota(per_peer=1024, total=4096)
RECORDS_STREAMS = StreamQuota(per_peer=16, total=512)
SPEEDTEST_STREAMS = StreamQuota(per_peer=2, total=16)
