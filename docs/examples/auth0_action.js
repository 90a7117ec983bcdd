/**
 * An Auth0 Action that posts sign-ups and logins to a mapped source of millimetric-bridge
 * (docs/handlers.md, "Without code"), signed the Standard Webhooks way.
 *
 * Use the same code for two Actions: one on the Post User Registration trigger, one on
 * Login / Post Login. Secrets of each Action:
 *   BRIDGE_URL     https://<your bridge>/webhooks/auth0-actions
 *   BRIDGE_SECRET  whsec_... (the value of AUTH0_ACTIONS_WEBHOOK_SECRET on the bridge)
 *
 * No dependency: Node's crypto and fetch. A bridge that cannot be reached never blocks a
 * login; the Action logs it and carries on.
 */
const crypto = require("crypto");

async function post(event, message) {
  const body = JSON.stringify(message);
  const timestamp = Math.floor(Date.now() / 1000).toString();
  const key = Buffer.from(event.secrets.BRIDGE_SECRET.replace(/^whsec_/, ""), "base64");
  const signature = crypto
    .createHmac("sha256", key)
    .update(`${message.id}.${timestamp}.${body}`)
    .digest("base64");
  try {
    const answer = await fetch(event.secrets.BRIDGE_URL, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "webhook-id": message.id, // the same id for the same sign-up or login
        "webhook-timestamp": timestamp,
        "webhook-signature": `v1,${signature}`,
      },
      body,
      signal: AbortSignal.timeout(5000),
    });
    if (!answer.ok) console.log(`millimetric-bridge answered ${answer.status}`);
  } catch (error) {
    console.log(`millimetric-bridge not reached: ${error.message}`);
  }
}

// The visitor's Millimetric anonymous id, if the app passed it to /authorize
// (authorizationParams: { millimetric_anonymous_id }): it attributes the sign-up.
function anonymousId(event) {
  const id = event.request && event.request.query && event.request.query.millimetric_anonymous_id;
  return typeof id === "string" && id ? id : undefined;
}

exports.onExecutePostUserRegistration = async (event) => {
  await post(event, {
    id: `signup:${event.user.user_id}`,
    type: "user.registered",
    time: new Date().toISOString(),
    user_id: event.user.user_id,
    connection: event.connection && event.connection.name,
    anonymous_id: anonymousId(event),
  });
};

exports.onExecutePostLogin = async (event) => {
  // Not a login: a refresh token exchanged, or a silent re-authentication (prompt=none).
  if (event.transaction && event.transaction.protocol === "oauth2-refresh-token") return;
  if (event.request && event.request.query && event.request.query.prompt === "none") return;
  await post(event, {
    id: `login:${event.user.user_id}:${event.stats.logins_count}`,
    type: "user.logged_in",
    time: new Date().toISOString(),
    user_id: event.user.user_id,
    connection: event.connection && event.connection.name,
    client_name: event.client && event.client.name,
    anonymous_id: anonymousId(event),
  });
};
