// The EHR's SMART authorization server of the integration tests: the `oidc-provider` package
// (an OpenID Certified server), configured as an EHR configures its SMART server:
// - SMART scopes (v2) on the FHIR server as the one resource server; granted = asked for, as
//   far as the EHR allows (`scopes` of the configuration);
// - an EHR launch: `launch` names the context (base64url JSON, as the SMART launcher's launch
//   ids do); its `patient` goes into the token response and into the access token;
// - JWT access tokens (RS384) with `aud` = the FHIR server, or opaque ones per client, and
//   RFC 7662 introspection for a confidential client (the service);
// - `.well-known/smart-configuration` of the FHIR endpoint (`iss`) the app is launched with.
// Started by tests/smart_auth_server.py with the configuration as JSON in SMART_AUTH_CONFIG:
// {port, fhirPath, scopes, apps: [{clientId, redirectUri, format, ttl}], introspection:
// {clientId, secret}}. Logins are the development login form (any name and password).
import Provider, { errors } from "oidc-provider";
import { exportJWK, generateKeyPair } from "jose";

const cfg = JSON.parse(process.env.SMART_AUTH_CONFIG);
const issuer = `http://127.0.0.1:${cfg.port}`;
const fhirBase = issuer + cfg.fhirPath;
const apps = new Map(cfg.apps.map((app) => [app.clientId, app]));
// The launch context of each authorization code (by its id) until the token is issued.
const launches = new Map();

function launchContext(launch) {
  try {
    return JSON.parse(Buffer.from(launch, "base64url").toString("utf8"));
  } catch {
    return {};
  }
}

const { privateKey } = await generateKeyPair("RS384", { extractable: true });
const signingKey = { ...(await exportJWK(privateKey)), kid: "ehr-rs384", use: "sig", alg: "RS384" };
const { privateKey: idKey } = await generateKeyPair("RS256", { extractable: true });
const idTokenKey = { ...(await exportJWK(idKey)), kid: "ehr-rs256", use: "sig", alg: "RS256" };

const clients = cfg.apps.map((app) => ({
  client_id: app.clientId,
  token_endpoint_auth_method: "none",
  redirect_uris: [app.redirectUri],
  grant_types: ["authorization_code"],
  response_types: ["code"],
}));
clients.push({
  client_id: cfg.introspection.clientId,
  client_secret: cfg.introspection.secret,
  token_endpoint_auth_method: "client_secret_basic",
  grant_types: [],
  response_types: [],
  redirect_uris: [],
});

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [idTokenKey, signingKey] },
  cookies: { keys: ["integration-tests-only"] },
  scopes: ["openid", "fhirUser", "launch", "launch/patient", "offline_access"],
  claims: { openid: ["sub"], fhirUser: ["fhirUser"] },
  extraParams: ["launch"],
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, fhirUser: `${fhirBase}/Practitioner/${id}` }),
  }),
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // SMART apps name the FHIR server with `aud`, not `resource`: it is the one resource.
      defaultResource: async () => fhirBase,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, indicator, client) => {
        if (indicator !== fhirBase) throw new errors.InvalidTarget();
        const app = apps.get(client.clientId);
        return {
          scope: cfg.scopes,
          audience: fhirBase,
          accessTokenFormat: app?.format ?? "jwt",
          accessTokenTTL: app?.ttl ?? 3600,
          jwt: { sign: { alg: "RS384" } },
        };
      },
    },
  },
  extraTokenClaims: async (ctx) => {
    const code = ctx.oidc.entities.AuthorizationCode;
    const context = code && launches.get(code.jti);
    return context?.patient ? { patient: context.patient } : undefined;
  },
});

provider.use(async (ctx, next) => {
  if (ctx.path === `${cfg.fhirPath}/.well-known/smart-configuration`) {
    ctx.set("Access-Control-Allow-Origin", "*");
    ctx.body = {
      issuer,
      jwks_uri: `${issuer}/jwks`,
      authorization_endpoint: `${issuer}/auth`,
      token_endpoint: `${issuer}/token`,
      introspection_endpoint: `${issuer}/token/introspection`,
      grant_types_supported: ["authorization_code"],
      response_types_supported: ["code"],
      token_endpoint_auth_methods_supported: ["none", "client_secret_basic"],
      code_challenge_methods_supported: ["S256"],
      scopes_supported: ["openid", "fhirUser", "launch", "launch/patient", ...cfg.scopes.split(" ")],
      capabilities: [
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "context-ehr-patient",
        "permission-patient",
        "permission-user",
        "permission-v2",
        "sso-openid-connect",
      ],
    };
    return;
  }
  await next();
  const code = ctx.oidc?.entities?.AuthorizationCode;
  if (!code) return;
  if (ctx.oidc.route === "authorization" || ctx.oidc.route === "resume") {
    const launch = ctx.oidc.params?.launch;
    if (launch) launches.set(code.jti, launchContext(launch));
  } else if (ctx.oidc.route === "token" && ctx.body?.access_token) {
    const context = launches.get(code.jti);
    if (context?.patient) ctx.body.patient = context.patient;
  }
});

provider.listen(cfg.port, "127.0.0.1", () => {
  console.log(`smart auth server listening on ${issuer}`);
});
