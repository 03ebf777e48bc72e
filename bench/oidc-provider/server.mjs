// The comparison token server for bench/token.sh: the npm `oidc-provider` package with the
// client credentials grant and ES256-signed JWT access tokens (RFC 9068 style), nothing else.
//
//   node bench/oidc-provider/server.mjs PORT CLIENT_ID CLIENT_SECRET RESOURCE
//
// Config: one confidential client (client_secret_basic, grant_types [client_credentials]);
// features.clientCredentials on; features.resourceIndicators on with the resource as default,
// getResourceServerInfo → { scope: 'orders.read', accessTokenFormat: 'jwt', jwt.sign.alg ES256 };
// one ES256 signing key generated at start; in-memory adapter (the default); no logging.
import { generateKeyPairSync } from 'node:crypto';

const [port, clientId, clientSecret, resource] = process.argv.slice(2);
if (!resource) {
  console.error('usage: server.mjs PORT CLIENT_ID CLIENT_SECRET RESOURCE');
  process.exit(2);
}
// The package is installed into bench/.node by bench/run-all.sh.
const { default: Provider } = await import(
  new URL('../.node/node_modules/oidc-provider/lib/index.js', import.meta.url)
);

const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const jwk = { ...privateKey.export({ format: 'jwk' }), alg: 'ES256', use: 'sig', kid: 'bench-es256' };

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'ES256', // the only key is ES256
      scope: 'orders.read',
    },
  ],
  scopes: ['orders.read'],
  jwks: { keys: [jwk] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, indicator) => {
        if (indicator !== resource) throw new Error('unknown resource');
        return {
          scope: 'orders.read',
          audience: resource,
          accessTokenTTL: 900,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
});
provider.proxy = false;
provider.listen(Number(port), '127.0.0.1', () => {
  console.log(`oidc-provider ${provider.issuer} ready`);
});
