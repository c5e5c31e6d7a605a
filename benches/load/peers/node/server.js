// keygate load ladder: Node peer. JWT auth in front of the upstream, one process.
//
//   LISTEN_PORT=8081 UPSTREAM_PORT=3000 ISSUER=... AUDIENCE=... JWKS_FILE=/path/jwks.json \
//     NODE_ENV=production node server.js
//
// Per request: Bearer token from Authorization -> jose jwtVerify against the local JWKS
// (RS256 only, exact iss, aud contains AUDIENCE, exp/nbf with 5 s tolerance like keygate's
// default leeway, sub required) -> Authorization removed, X-User: <sub> added -> proxied
// over a keep-alive agent. Responses are piped as they arrive (no compression, no
// buffering), so text/event-stream is forwarded event by event. No request logging.

import http from 'node:http';
import { readFileSync } from 'node:fs';
import express from 'express';
import { createProxyMiddleware } from 'http-proxy-middleware';
import { createLocalJWKSet, jwtVerify } from 'jose';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`missing environment variable ${name}`);
    process.exit(2);
  }
  return value;
}

const listenPort = Number(required('LISTEN_PORT'));
const upstreamPort = Number(required('UPSTREAM_PORT'));
const issuer = required('ISSUER');
const audience = required('AUDIENCE');
const jwks = createLocalJWKSet(JSON.parse(readFileSync(required('JWKS_FILE'), 'utf8')));

const verifyOptions = {
  algorithms: ['RS256'],
  issuer,
  audience,
  clockTolerance: 5,
  requiredClaims: ['exp', 'sub'],
};

const BEARER = /^Bearer[ ]+([^ ]+)[ ]*$/i;

function unauthorized(res) {
  res.writeHead(401, { 'content-type': 'text/plain', 'www-authenticate': 'Bearer' });
  res.end('unauthorized');
}

async function authenticate(req, res, next) {
  // Never trust a client-supplied identity header.
  delete req.headers['x-user'];
  const header = req.headers.authorization;
  const match = typeof header === 'string' ? BEARER.exec(header) : null;
  if (match === null) return unauthorized(res);
  let payload;
  try {
    ({ payload } = await jwtVerify(match[1], jwks, verifyOptions));
  } catch {
    return unauthorized(res);
  }
  if (typeof payload.sub !== 'string' || payload.sub === '') return unauthorized(res);
  delete req.headers.authorization;
  req.headers['x-user'] = payload.sub;
  next();
}

const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

const proxy = createProxyMiddleware({
  target: `http://127.0.0.1:${upstreamPort}`,
  agent,
  changeOrigin: false,
  xfwd: false,
});

const app = express();
app.disable('x-powered-by');
app.disable('etag');
app.use(authenticate);
app.use(proxy);

const server = http.createServer(app);
// Idle SSE streams and idle keep-alive clients may sit for minutes.
server.keepAliveTimeout = 3600_000;
server.timeout = 0;
server.listen(listenPort, '127.0.0.1', 4096, () => {
  console.error(`node peer listening on 127.0.0.1:${listenPort} -> 127.0.0.1:${upstreamPort}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
