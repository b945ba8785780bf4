// The Sluice dashboard: plain JavaScript over the broker's JSON API (/api/v1).
// Pages are hash routes; the current page re-reads its data every REFRESH_MS and redraws
// only when the data changed. Changes (POST) carry the X-Sluice-Request header the API
// requires, and the auth token, asked once and kept in sessionStorage (reads carry it too).
"use strict";

const API = "/api/v1";
const REFRESH_MS = 1000;
const TOKEN_KEY = "sluice-token";
const STATES = ["ready", "delayed", "reserved", "dead"];
const PAGE_SIZE = 20;

const main = document.getElementById("main");
let shown = ""; // the route and data last drawn: skip a redraw that would change nothing
let refreshing = false;
let again = false; // a refresh was asked for while one ran

// ------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function svg(tag, attrs) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  return element;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code ? body.code : "HTTP_" + status;
  }
}

// A read: carries the token once there is one (a broker with an --auth-file wants it for
// reads too); a 401 asks for it, then reads again.
async function getJson(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(API + path, { headers });
  const body = await response.json().catch(() => null);
  if (response.status === 401 && !document.getElementById("token-dialog").open) {
    askToken().then((given) => {
      if (given === null) return;
      shown = "";
      refresh();
    });
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function flash(text, kind) {
  const box = document.getElementById("flash");
  box.textContent = text;
  box.className = kind || "";
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const date = new Date(seconds * 1000);
  const delta = Math.round(seconds - Date.now() / 1000);
  const relative = delta >= 0 ? `in ${delta}s` : `${-delta}s ago`;
  return `${date.toLocaleTimeString()} (${relative})`;
}

function rate(value) {
  return value === null || value === undefined ? "—" : value.toFixed(1);
}

function bodyText(body) {
  if (!body) return "—";
  const text = body.text !== undefined ? body.text : `base64:${body.base64}`;
  return body.truncated ? `${text}… (${body.size} bytes)` : text;
}

function link(href, text, attrs) {
  return h("a", Object.assign({ href }, attrs || {}), text);
}

const enc = encodeURIComponent;

// ----------------------------------------------------------- token, confirm

function askToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = sessionStorage.getItem(TOKEN_KEY) || "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue !== "ok") return resolve(null);
        sessionStorage.setItem(TOKEN_KEY, input.value);
        resolve(input.value);
      },
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

function confirmed(text) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

// A change: asks for the token the first time, confirms if `question`, then POSTs.
async function change(path, body, question, done) {
  if (question && !(await confirmed(question))) return;
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (token === null) token = await askToken();
  if (token === null) return;
  const headers = { "X-Sluice-Request": "1", "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const response = await fetch(API + path, {
      method: "POST",
      headers,
      body: JSON.stringify(body || {}),
    });
    const answer = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, answer);
    flash(done(answer), "ok");
  } catch (error) {
    if (error.code === "UNAUTHORIZED" || error.code === "FORBIDDEN") {
      sessionStorage.removeItem(TOKEN_KEY); // asked again on the next change
    }
    flash(`${error.code}: ${error.message}`, "error");
  }
  shown = "";
  refresh();
}

// ------------------------------------------------------------------- pages

function card(label, value, id) {
  return h("div", { class: "card" },
    h("div", { class: "label" }, label),
    h("div", { class: "value", "data-testid": id }, value));
}

function depthBar(queue) {
  const total = STATES.reduce((sum, state) => sum + queue[state], 0);
  const bar = h("div", { class: "bar", title: STATES.map((s) => `${s} ${queue[s]}`).join(", ") });
  for (const state of STATES) {
    if (!total || !queue[state]) continue;
    const part = h("span", { class: state });
    part.style.width = `${(100 * queue[state]) / total}%`;
    bar.append(part);
  }
  return bar;
}

function chart(history) {
  const width = 600, height = 160, pad = 4;
  const box = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
    role: "img", "aria-label": "put/s and acked/s" });
  const top = Math.max(1, ...history.map((p) => Math.max(p.put_per_s, p.acked_per_s)));
  box.append(svg("line", { x1: 0, y1: height - pad, x2: width, y2: height - pad,
    stroke: "#dde2ea" }));
  for (const [key, colour] of [["put_per_s", "#2f7de1"], ["acked_per_s", "#2aa876"]]) {
    const points = history.map((point, index) => {
      const x = history.length < 2 ? 0 : (index * width) / (history.length - 1);
      const y = height - pad - ((height - 2 * pad) * point[key]) / top;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    box.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: colour,
      "stroke-width": 2, "vector-effect": "non-scaling-stroke" }));
  }
  return h("div", { class: "panel chart" },
    h("div", { class: "legend" },
      h("span", {}, h("i", { class: "put" }), "put/s"),
      h("span", {}, h("i", { class: "acked" }), "acked/s"),
      h("span", {}, `peak ${top.toFixed(1)}/s, last ${history.length} s`)),
    box);
}

function queueTable(queues) {
  if (!queues.length) return h("p", { class: "muted" }, "No queues yet: a put creates one.");
  return h("table", { "data-testid": "queues" },
    h("thead", {}, h("tr", {}, h("th", {}, "queue"),
      ...STATES.map((s) => h("th", { class: "num" }, s)), h("th", {}, "depth"), h("th", {}, ""))),
    h("tbody", {}, queues.map((queue) =>
      h("tr", { "data-queue": queue.name },
        h("td", {}, link(`#/queue/${enc(queue.name)}/ready`, queue.name)),
        ...STATES.map((s) => h("td", { class: "num", "data-state": s }, queue[s])),
        h("td", {}, depthBar(queue)),
        h("td", {}, queue.paused ? h("span", { class: "badge paused" }, "paused") : "")))));
}

const pages = {
  async overview() {
    const overview = await getJson("/overview");
    const queues = overview.deepest.slice().sort((a, b) => (a.name < b.name ? -1 : 1));
    return () => [
      h("h1", {}, "Overview"),
      h("div", { class: "cards" },
        card("queues", overview.queues, "total-queues"),
        ...STATES.map((s) => card(s, overview.messages[s], `total-${s}`)),
        card("put/s", rate(overview.rates.put_per_s), "put-rate"),
        card("acked/s", rate(overview.rates.acked_per_s), "acked-rate"),
        card("connections", overview.connections, "total-connections")),
      h("h2", {}, "Throughput"),
      chart(overview.history),
      h("h2", {}, "Queues"),
      overview.queues > queues.length
        ? h("p", { class: "muted" }, `The ${queues.length} deepest of ${overview.queues} queues.`)
        : "",
      queueTable(queues),
    ];
  },

  async queue(name, tab, after) {
    tab = STATES.includes(tab) ? tab : "ready";
    const query = `state=${tab}&limit=${PAGE_SIZE}` + (after ? `&after=${enc(after)}` : "");
    const [stats, page] = await Promise.all([
      getJson(`/queues/${enc(name)}`),
      getJson(`/queues/${enc(name)}/messages?${query}`),
    ]);
    const path = `/queues/${enc(name)}`;
    const actions = [
      stats.paused
        ? h("button", { "data-testid": "resume", onclick: () =>
            change(`${path}/resume`, null, null, () => `${name} resumed`) }, "Resume")
        : h("button", { "data-testid": "pause", onclick: () =>
            change(`${path}/pause`, null, null, () => `${name} paused`) }, "Pause"),
      h("button", { class: "danger", "data-testid": "purge", onclick: () =>
        change(`${path}/purge`, null,
          `Delete every ready and delayed message of ${name}? This cannot be undone.`,
          (a) => `purged ${a.purged} messages`) }, "Purge ready + delayed"),
    ];
    if (tab === "dead") {
      actions.push(
        h("button", { "data-testid": "replay-all", onclick: () =>
          change(`${path}/replay`, null, `Replay every dead letter of ${name}?`,
            (a) => `replayed ${a.replayed}`) }, "Replay all"),
        h("button", { class: "danger", "data-testid": "purge-dead", onclick: () =>
          change(`${path}/purge-dead`, null, `Delete every dead letter of ${name}?`,
            (a) => `deleted ${a.purged} dead letters`) }, "Delete all dead"));
    }
    return () => [
      h("h1", {}, `Queue ${name} `,
        stats.paused ? h("span", { class: "badge paused", "data-testid": "paused" }, "paused") : ""),
      h("div", { class: "cards" }, ...STATES.map((s) => card(s, stats[s], `queue-${s}`)),
        card("waiting consumers", stats.waiting, "queue-waiting")),
      h("div", { class: "actions" }, actions),
      h("div", { class: "tabs" }, STATES.map((s) =>
        link(`#/queue/${enc(name)}/${s}`, `${s} (${stats[s]})`,
          { class: s === tab ? "active" : null, "data-testid": `tab-${s}` }))),
      messageTable(name, tab, page.items),
      h("div", { class: "actions" },
        after ? link(`#/queue/${enc(name)}/${tab}`, "First page") : "",
        page.next ? link(`#/queue/${enc(name)}/${tab}?after=${page.next}`, "Next page",
          { "data-testid": "next-page" }) : ""),
    ];
  },

  async job(id) {
    let status;
    try {
      status = await getJson(`/messages/${enc(id)}`);
    } catch (error) {
      return () => [h("h1", {}, `Job ${id}`),
        h("p", { class: "error", "data-testid": "job-error" }, `${error.code}: ${error.message}`)];
    }
    const fields = [
      ["queue", link(`#/queue/${enc(status.queue)}/${STATES.includes(status.state) ? status.state : "ready"}`, status.queue)],
      ["state", h("span", { "data-testid": "job-state" }, status.state)],
    ];
    if (status.position !== undefined) {
      fields.push(["position", h("span", { "data-testid": "job-position" },
        `${status.position} ahead of it` +
        (status.eta_s !== undefined ? `, about ${Math.round(status.eta_s)} s` : ""))]);
    }
    const optional = [
      ["priority", status.priority],
      ["attempts", status.attempts !== undefined
        ? `${status.attempts} of ${status.max_attempts === null ? "unlimited" : status.max_attempts}`
        : undefined],
      ["enqueued", status.enqueued_at !== undefined ? when(status.enqueued_at) : undefined],
      ["due", status.due_at ? when(status.due_at) : undefined],
      ["lease deadline", status.lease_deadline ? when(status.lease_deadline) : undefined],
      ["progress", status.progress
        ? `${status.progress.percent}% ${status.progress.note || ""}` : undefined],
      ["last error", status.last_error || undefined],
      ["dead reason", status.dead_reason || undefined],
      ["dead since", status.dead_at ? when(status.dead_at) : undefined],
      ["done", status.done_at ? when(status.done_at) : undefined],
      ["key", status.key],
    ];
    for (const [label, value] of optional) if (value !== undefined && value !== null) fields.push([label, value]);
    if (status.headers && Object.keys(status.headers).length) {
      fields.push(["headers", h("pre", {}, JSON.stringify(status.headers, null, 2))]);
    }
    if (status.body) fields.push(["body", h("pre", { "data-testid": "job-body" }, bodyText(status.body))]);
    if ("result" in status) fields.push(["result", h("pre", {}, JSON.stringify(status.result, null, 2))]);
    const actions = [];
    if (status.state === "ready" || status.state === "delayed") {
      actions.push(h("button", { class: "danger", onclick: () =>
        change(`/messages/${status.id}/cancel`, null, `Cancel job ${status.id}?`,
          (a) => (a.cancelled ? `job ${status.id} cancelled` : "it had moved on: not cancelled")) },
        "Cancel"));
    }
    if (status.state === "dead") {
      actions.push(h("button", { onclick: () =>
        change(`/queues/${enc(status.queue)}/replay`, { ids: [status.id] }, null,
          (a) => `replayed ${a.replayed}`) }, "Replay"));
    }
    return () => [
      h("h1", {}, `Job ${status.id}`),
      h("div", { class: "panel" }, h("dl", { class: "fields" },
        fields.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]))),
      h("div", { class: "actions" }, actions),
    ];
  },

  async dead() {
    const { queues } = await getJson("/queues");
    const dead = queues.filter((queue) => queue.dead > 0);
    return () => [
      h("h1", {}, "Dead letters"),
      dead.length
        ? h("table", { "data-testid": "dead-queues" },
            h("thead", {}, h("tr", {}, h("th", {}, "queue"), h("th", { class: "num" }, "dead"),
              h("th", {}, ""))),
            h("tbody", {}, dead.map((queue) => h("tr", { "data-queue": queue.name },
              h("td", {}, link(`#/queue/${enc(queue.name)}/dead`, queue.name)),
              h("td", { class: "num" }, queue.dead),
              h("td", {}, h("div", { class: "actions" },
                h("button", { onclick: () =>
                  change(`/queues/${enc(queue.name)}/replay`, null,
                    `Replay every dead letter of ${queue.name}?`, (a) => `replayed ${a.replayed}`) },
                  "Replay all"),
                h("button", { class: "danger", onclick: () =>
                  change(`/queues/${enc(queue.name)}/purge-dead`, null,
                    `Delete every dead letter of ${queue.name}?`,
                    (a) => `deleted ${a.purged} dead letters`) }, "Delete all")))))))
        : h("p", { class: "muted" }, "No dead letters."),
    ];
  },

  async connections() {
    const { connections } = await getJson("/connections");
    return () => [
      h("h1", {}, "Connections"),
      h("table", { "data-testid": "connections" },
        h("thead", {}, h("tr", {}, ["id", "peer", "client", "consumer", "delivered", "waiting",
          "requests", "opened"].map((label) => h("th", {}, label)))),
        h("tbody", {}, connections.map((c) => h("tr", {},
          h("td", {}, c.id), h("td", {}, c.peer), h("td", {}, c.client),
          h("td", {}, c.consumer ? "yes" : "no"), h("td", { class: "num" }, c.delivered),
          h("td", { class: "num" }, c.waiting), h("td", { class: "num" }, c.requests),
          h("td", {}, when(c.opened_at)))))),
    ];
  },
};

function messageTable(queue, tab, items) {
  if (!items.length) return h("p", { class: "muted", "data-testid": "no-messages" }, `No ${tab} messages.`);
  const timeHeader = { ready: "enqueued", delayed: "due", reserved: "lease deadline", dead: "reason" }[tab];
  return h("table", { "data-testid": "messages" },
    h("thead", {}, h("tr", {}, ["id", "priority", "attempts", timeHeader, "body", ""]
      .map((label) => h("th", {}, label)))),
    h("tbody", {}, items.map((m) => h("tr", { "data-id": m.id },
      h("td", {}, link(`#/job/${m.id}`, m.id)),
      h("td", { class: "num" }, m.priority),
      h("td", { class: "num" }, m.attempts),
      h("td", {}, tab === "ready" ? when(m.enqueued_at) : tab === "delayed" ? when(m.due_at)
        : tab === "reserved" ? when(m.lease_deadline) : `${m.dead_reason || ""} ${m.last_error || ""}`),
      h("td", {}, bodyText(m.body)),
      h("td", {}, rowAction(queue, tab, m))))));
}

function rowAction(queue, tab, message) {
  if (tab === "dead") {
    return h("button", { "data-testid": `replay-${message.id}`, onclick: () =>
      change(`/queues/${enc(queue)}/replay`, { ids: [message.id] }, null,
        (a) => `replayed ${a.replayed}`) }, "Replay");
  }
  if (tab === "ready" || tab === "delayed") {
    return h("button", { class: "quiet", "data-testid": `cancel-${message.id}`, onclick: () =>
      change(`/messages/${message.id}/cancel`, null, `Cancel job ${message.id}?`,
        (a) => (a.cancelled ? `job ${message.id} cancelled` : "it had moved on: not cancelled")) },
      "Cancel");
  }
  return "";
}

// ------------------------------------------------------------------ routing

function currentRoute() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const after = new URLSearchParams(query || "").get("after");
  if (parts[0] === "queue" && parts[1]) return ["queue", [parts[1], parts[2], after]];
  if (parts[0] === "job" && parts[1]) return ["job", [parts[1]]];
  if (parts[0] === "dead") return ["dead", []];
  if (parts[0] === "connections") return ["connections", []];
  return ["overview", []];
}

async function refresh() {
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = true;
  const [page, args] = currentRoute();
  const key = location.hash;
  try {
    const draw = await pages[page](...args);
    const nodes = draw();
    const fingerprint = key + "\n" + nodes.map((node) => node.outerHTML || String(node)).join("");
    if (fingerprint !== shown && key === location.hash) {
      shown = fingerprint;
      main.replaceChildren(...nodes);
    }
    document.getElementById("status-line").textContent =
      `live: refreshed ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("status-line").textContent = `cannot reach the broker: ${error.message}`;
  } finally {
    refreshing = false;
  }
  if (again) {
    again = false;
    refresh();
    return;
  }
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
  }
}

window.addEventListener("hashchange", () => {
  shown = "";
  flash("");
  refresh();
});
document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = document.getElementById("search-id").value.trim();
  if (id) location.hash = `#/job/${enc(id)}`;
});
document.getElementById("token-button").addEventListener("click", () => askToken());
setInterval(refresh, REFRESH_MS);
refresh();
