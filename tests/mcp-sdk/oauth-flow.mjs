// Drives keygate with the official MCP TypeScript SDK client, the way an MCP client on a
// developer's machine does: connect -> 401 -> discovery -> dynamic registration -> the dev
// authorization server's page "clicked" (page fetched, form posted, code read from the 303) ->
// code + PKCE + resource -> token; then the user stores an upstream key and calls tools.
//
//   node tests/mcp-sdk/oauth-flow.mjs <keygate base url> <upstream api key to store>
//
// Prints one JSON object on stdout; exits non-zero (with the reason on stderr) on any failure.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';

const [base, apiKey] = process.argv.slice(2);
if (!base || !apiKey) {
  console.error('usage: node oauth-flow.mjs <keygate base url> <api key>');
  process.exit(2);
}

// Nothing listens here: the "browser" below reads the code from the redirect instead.
const REDIRECT_URL = 'http://127.0.0.1:33418/callback';

/// The value of `<input ... name="NAME" value="...">` in the consent page.
function field(html, name) {
  const m = html.match(new RegExp(`name="${name}" value="([^"]*)"`));
  if (!m) throw new Error(`the authorization page has no ${name} field`);
  return m[1].replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>').replace(/&amp;/g, '&');
}

class ClickingProvider {
  constructor() {
    this.steps = [];
    this._client = undefined;
    this._tokens = undefined;
    this._verifier = undefined;
    this._state = undefined;
    this._discovery = undefined;
    this.code = undefined;
  }
  get redirectUrl() { return REDIRECT_URL; }
  get clientMetadata() {
    return {
      client_name: 'keygate SDK test',
      redirect_uris: [REDIRECT_URL],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'none',
    };
  }
  state() {
    this._state = `state-${Math.random().toString(36).slice(2)}`;
    return this._state;
  }
  clientInformation() { return this._client; }
  saveClientInformation(info) { this.steps.push('registered'); this._client = info; }
  tokens() { return this._tokens; }
  saveTokens(tokens) { this.steps.push('tokens'); this._tokens = tokens; }
  saveCodeVerifier(v) { this._verifier = v; }
  codeVerifier() { return this._verifier; }
  saveDiscoveryState(s) { this._discovery = s; }
  discoveryState() { return this._discovery; }

  // The developer's browser: show the page, press "Allow" with its defaults, follow nothing.
  async redirectToAuthorization(url) {
    this.steps.push('authorize');
    this.authorizeUrl = url.toString();
    const page = await fetch(url, { redirect: 'manual' });
    if (page.status !== 200) throw new Error(`authorization page: HTTP ${page.status} ${await page.text()}`);
    const html = await page.text();
    const form = new URLSearchParams({
      request: field(html, 'request'),
      user: field(html, 'user'),
      org: 'org_sdk',
      scope: field(html, 'scope'),
      decision: 'allow',
    });
    const action = new URL(url);
    const answer = await fetch(action.origin + action.pathname, {
      method: 'POST',
      body: form,
      redirect: 'manual',
    });
    if (answer.status !== 303) throw new Error(`consent: HTTP ${answer.status} ${await answer.text()}`);
    const location = new URL(answer.headers.get('location'));
    if (location.origin + location.pathname !== REDIRECT_URL) throw new Error(`redirected to ${location}`);
    if (location.searchParams.get('state') !== this._state) throw new Error('state did not round-trip');
    this.code = location.searchParams.get('code');
    if (!this.code) throw new Error(`no code: ${location}`);
  }
}

async function main() {
  const mcpUrl = new URL('/mcp', base);
  const provider = new ClickingProvider();

  // First attempt: keygate answers 401; the SDK discovers, registers and "redirects".
  let transport = new StreamableHTTPClientTransport(mcpUrl, { authProvider: provider });
  let client = new Client({ name: 'keygate-sdk-test', version: '1.0.0' });
  let first = 'connected';
  try {
    await client.connect(transport);
  } catch (e) {
    if (!(e instanceof UnauthorizedError)) throw e;
    first = 'unauthorized';
  }
  if (first !== 'unauthorized' || !provider.code) throw new Error(`expected the OAuth redirect, got ${first}`);
  await transport.finishAuth(provider.code);
  await transport.close().catch(() => {});

  const tokens = provider.tokens();
  // The signed-in user stores their upstream key in keygate's vault.
  const stored = await fetch(new URL('/api/keys', base), {
    method: 'POST',
    headers: { authorization: `Bearer ${tokens.access_token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ apiKey }),
  });
  if (stored.status !== 200) throw new Error(`storing the key: HTTP ${stored.status} ${await stored.text()}`);

  // Second attempt: authorized.
  transport = new StreamableHTTPClientTransport(mcpUrl, { authProvider: provider });
  client = new Client({ name: 'keygate-sdk-test', version: '1.0.0' });
  await client.connect(transport);
  const listed = await client.listTools();
  const called = await client.callTool({ name: 'get_received_key', arguments: {} });
  await client.close();

  const authorize = new URL(provider.authorizeUrl);
  const claims = JSON.parse(Buffer.from(tokens.access_token.split('.')[1], 'base64url').toString());
  process.stdout.write(JSON.stringify({
    first,
    steps: provider.steps,
    authorize: {
      code_challenge_method: authorize.searchParams.get('code_challenge_method'),
      resource: authorize.searchParams.get('resource'),
      scope: authorize.searchParams.get('scope'),
    },
    token_type: tokens.token_type,
    has_refresh_token: typeof tokens.refresh_token === 'string',
    claims: { iss: claims.iss, aud: claims.aud, sub: claims.sub, scope: claims.scope, org: claims.o?.id },
    server: client.getServerVersion()?.name,
    tools: listed.tools.map((t) => t.name),
    call_text: called.content?.[0]?.text,
  }) + '\n');
}

main().catch((e) => {
  console.error(e?.stack ?? String(e));
  process.exit(1);
});
