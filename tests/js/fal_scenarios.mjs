// fal's own JavaScript client (@fal-ai/client, pinned in package.json) against sam2serve's HTTP API, driven by
// tests/test_fal_js.py: every scenario runs in order, and one JSON line on stdout says what each saw or threw.
// Configuration (JSON in FAL_SCENARIOS): bases (the servers' base URLs), key, app, png (base64), quick and slow
// (inputs), webhook (a URL collecting webhooks), missing (an image URL that answers 404), proxy (true: the
// README's proxyUrl setting; false: a requestMiddleware that sends each call to the next base in turn, as a
// load balancer would, on fal's own paths).
import { createFalClient } from "@fal-ai/client";

const config = JSON.parse(process.env.FAL_SCENARIOS);
const { app, key, quick, slow } = config;
const png = Buffer.from(config.png, "base64");
const imageUrl = `data:image/png;base64,${config.png}`;
const DEADLINE_MS = 600_000;

function client(credentials) {
  if (config.proxy) {
    return createFalClient({ credentials, proxyUrl: { url: `${config.bases[0]}/fal/proxy`, when: "always" } });
  }
  let turn = 0;
  const hosts = { "https://queue.fal.run": "/queue", "https://fal.run": "", "https://rest.fal.ai": "" };
  const requestMiddleware = async (request) => {
    const base = config.bases[turn++ % config.bases.length];
    for (const [host, path] of Object.entries(hosts)) {
      if (request.url.startsWith(host + "/")) {
        return { ...request, url: base + path + request.url.slice(host.length) };
      }
    }
    throw new Error(`not a fal URL: ${request.url}`);
  };
  return createFalClient({ credentials, requestMiddleware });
}

const fal = client(key);

function describe(error) {
  return { name: error?.name, status: error?.status, message: error?.message, body: error?.body,
           fieldErrors: typeof error?.getFieldErrors === "function" ? error.getFieldErrors("image_url") : undefined };
}

async function thrown(promise) {
  try {
    await promise;
  } catch (error) {
    return describe(error);
  }
  throw new Error("expected an error, got none");
}

async function until(requestId, wanted) {
  const start = Date.now();
  for (;;) {
    const status = await fal.queue.status(app, { requestId, logs: true });
    if (wanted.includes(status.status)) return status;
    if (Date.now() - start > DEADLINE_MS) throw new Error(`${requestId} never reached ${wanted}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const results = {};
async function scenario(name, run) {
  try {
    results[name] = { ok: true, value: await run() };
  } catch (error) {
    results[name] = { ok: false, error: { ...describe(error), stack: error?.stack } };
  }
}

let blocker;
await scenario("subscribe", async () => {
  ({ request_id: blocker } = await fal.queue.submit(app, { input: { image_url: imageUrl, ...slow } }));
  await until(blocker, ["IN_PROGRESS"]); // the only worker is busy: the next request waits in the queue
  const updates = [];
  let cancelling;
  const result = await fal.subscribe(app, {
    input: { image_url: new Blob([png], { type: "image/png" }), ...quick }, // uploaded by the client first
    logs: true,
    mode: "streaming",
    onQueueUpdate: (update) => {
      updates.push(update);
      if (update.status === "IN_QUEUE" && cancelling === undefined) {
        cancelling = fal.queue.cancel(app, { requestId: blocker }); // free the worker once the place was seen
      }
    },
  });
  await cancelling;
  return { updates, requestId: result.requestId, data: result.data };
});

await scenario("cancelled_in_progress", async () => {
  const status = await until(blocker, ["COMPLETED"]);
  return { status, result: await thrown(fal.queue.result(app, { requestId: blocker })) };
});

await scenario("submit_status_result", async () => {
  const { request_id: requestId } = await fal.queue.submit(app, {
    input: { image_url: imageUrl, ...quick }, webhookUrl: config.webhook });
  const first = await fal.queue.status(app, { requestId, logs: true });
  const final = await fal.queue.subscribeToStatus(app, { requestId, logs: true, pollInterval: 100 });
  const result = await fal.queue.result(app, { requestId });
  return { requestId, first, final, result };
});

await scenario("cancel_in_queue_and_full_queue", async () => {
  const { request_id: running } = await fal.queue.submit(app, { input: { image_url: imageUrl, ...slow } });
  await until(running, ["IN_PROGRESS"]);
  const { request_id: waiting } = await fal.queue.submit(app, { input: { image_url: imageUrl, ...quick } });
  const waitingStatus = await fal.queue.status(app, { requestId: waiting });
  const full = await thrown(fal.queue.submit(app, { input: { image_url: imageUrl, ...quick } })); // after its retries
  await fal.queue.cancel(app, { requestId: waiting });
  const waitingFinal = await fal.queue.status(app, { requestId: waiting, logs: true });
  const waitingResult = await thrown(fal.queue.result(app, { requestId: waiting }));
  await fal.queue.cancel(app, { requestId: running });
  const runningFinal = await until(running, ["COMPLETED"]);
  return { waitingStatus, full, waitingFinal, waitingResult, runningFinal };
});

await scenario("run_sync_mode", async () =>
  fal.run(app, { input: { image_url: imageUrl, sync_mode: true, ...quick } }));

await scenario("bad_image_url", async () => ({
  run: await thrown(fal.run(app, { input: { image_url: config.missing } })),
  subscribe: await thrown(fal.subscribe(app, { input: { image_url: config.missing }, pollInterval: 100 })),
}));

await scenario("keys", async () => ({
  wrong: await thrown(client("not-the-key").queue.submit(app, { input: { image_url: imageUrl } })),
  missing: await thrown(client(undefined).queue.submit(app, { input: { image_url: imageUrl } })),
}));

console.log(JSON.stringify(results));
