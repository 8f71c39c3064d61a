"""Protocol ids and message limits shared by the client and the server runtime."""

RPC = "/jupyter-swarm/rpc/1.0.0"  # forward, backward, info: one request -> one reply, repeatable on a stream
INFERENCE = "/jupyter-swarm/inference/1.0.0"  # open -> opened, then step -> output ... until the stream closes

MAX_BATCH_TOKENS = 16_384  # batch * sequence length accepted in one forward/backward/step
MAX_BATCH_SIZE = 256
PUSH = "/jupyter-swarm/push/1.0.0"  # server -> next server: a session's step output, one-way, repeatable on a stream
SPEEDTEST = "/jupyter-swarm/speedtest/1.0.0"  # one payload -> an acknowledgement: measures a link's bandwidth
SPEEDTEST_MAX_BYTES = 8 * 2**20
