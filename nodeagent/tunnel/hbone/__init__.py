"""HBONE: HTTP/2 CONNECT over mutual TLS between node tunnels.

- `limits`: windows, frame sizes, the bounds on hostile peers, timeouts, the reasons refusals are counted under;
- `request`: what a CONNECT means (pure);
- `patches`: hyperframe specialised for the data path (`install()`), and the h2 / hyperframe internals relied on;
- `framing`: h2's connection with fewer copies, and the screen every received frame passes;
- `connection`: one HTTP/2 connection's streams and data path, either side;
- `server`: the 15008 listener and what it does with each CONNECT;
- `client`: connections to peer tunnels, CONNECT streams, and the pool.
"""
