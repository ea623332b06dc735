// Headcount live dashboard. Plain JavaScript, no library: data from /api (JSON) and /api/live
// (Server-Sent Events, one shared frame per publish tick), chart as SVG.
"use strict";

const T = {
  vi: {
    title: "Điểm danh toàn quốc", session: "Phiên", allSessions: "Tất cả các phiên", connecting: "Đang kết nối",
    live: "Trực tiếp", reconnecting: "Đang kết nối lại", updated: "Cập nhật", big: "Màn hình lớn", normal: "Màn hình thường",
    logout: "Đăng xuất", checkedIn: "Đã điểm danh", registered: "Đăng ký", turnout: "Tỷ lệ",
    sitesReporting: "Điểm cầu báo cáo", curve: "Đường điểm danh", back: "← Quay lại", laggards: "Chậm nhất trước",
    export: "Xuất CSV", exTotals: "tổng", exSites: "điểm cầu", exSilent: "im lặng", exCorrections: "hiệu chỉnh",
    name: "Tên", silent: "Im lặng", silentSites: "Điểm cầu im lặng", site: "Điểm cầu", province: "Tỉnh",
    lastSeen: "Lần cuối", contact: "Liên hệ", corrections: "Hiệu chỉnh", time: "Giờ", change: "Thay đổi",
    reason: "Lý do", national: "Toàn quốc", never: "chưa bao giờ", other: "English",
  },
  en: {
    title: "National check-in", session: "Session", allSessions: "All sessions", connecting: "Connecting",
    live: "Live", reconnecting: "Reconnecting", updated: "Updated", big: "Big screen", normal: "Normal view",
    logout: "Log out", checkedIn: "Checked in", registered: "Registered", turnout: "Turnout",
    sitesReporting: "Sites reporting", curve: "Check-in curve", back: "← Back", laggards: "Laggards first",
    export: "Export CSV", exTotals: "totals", exSites: "sites", exSilent: "silent", exCorrections: "corrections",
    name: "Name", silent: "Silent", silentSites: "Silent sites", site: "Site", province: "Province",
    lastSeen: "Last seen", contact: "Contact", corrections: "Corrections", time: "Time", change: "Change",
    reason: "Reason", national: "National", never: "never", other: "Tiếng Việt",
  },
};

const params = new URLSearchParams(location.search);
const S = {
  lang: params.get("lang") || localStorage.getItem("headcount.lang") || "vi",
  meta: null,
  session: "all",
  path: [],            // [{kind, id, name}] below national
  national: null,      // TotalsJson
  provinces: [],       // TotalsJson, registry order
  rows: [],            // rows of the table now shown
  sort: { key: null, asc: true },
  source: null,
  status: "connecting",
  lastFrame: 0,
  refreshing: false,
};

const $ = (sel) => document.querySelector(sel);
const t = (key) => T[S.lang][key] || key;
const locale = () => (S.lang === "vi" ? "vi-VN" : "en-GB");
const num = (n) => Number(n).toLocaleString(locale());
const pct = (p) => Number(p).toLocaleString(locale(), { minimumFractionDigits: 1, maximumFractionDigits: 1 }) + " %";
const clock = (ms) => ms > 0 ? new Intl.DateTimeFormat(locale(), {
  timeZone: S.meta ? S.meta.time_zone : "Asia/Ho_Chi_Minh", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
}).format(new Date(ms)) : t("never");
const sessionParam = () => (S.session === "all" ? "all" : String(S.session));
const scope = () => (S.path.length ? S.path[S.path.length - 1].kind + ":" + S.path[S.path.length - 1].id : "national");

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { location.href = "/login"; throw new Error("login needed"); }
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function text(el, s) { if (el.textContent !== s) el.textContent = s; }

function translate() {
  document.documentElement.lang = S.lang;
  document.querySelectorAll("[data-t]").forEach((el) => text(el, t(el.dataset.t)));
  text($("#lang"), t("other"));
  text($("#bigmode"), document.body.classList.contains("big") ? t("normal") : t("big"));
  setStatus(S.status);
  fillSessions();
  render();
}

function setStatus(s) {
  S.status = s;
  const el = $("#status");
  el.dataset.state = s;
  text(el, t(s));
}

function fillSessions() {
  if (!S.meta) return;
  const sel = $("#session");
  const opts = [["all", t("allSessions")]].concat(S.meta.sessions.map((s) => [String(s.id), s.id + " — " + s.name]));
  sel.innerHTML = "";
  for (const [v, label] of opts) {
    const o = document.createElement("option");
    o.value = v; o.textContent = label; sel.appendChild(o);
  }
  sel.value = sessionParam();
}

function renderHero() {
  const n = S.national;
  if (!n) return;
  text($("#national-count"), num(n.count));
  text($("#national-registered"), num(n.registered));
  text($("#national-turnout"), pct(n.turnout_pct));
  text($("#national-sites"), num(n.sites_reporting) + " / " + num(n.sites_total));
}

function sortedRows() {
  const rows = S.rows.slice();
  const { key, asc } = S.sort;
  if (key) {
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      const c = typeof x === "string" ? x.localeCompare(y, locale()) : x - y;
      return asc ? c : -c;
    });
  }
  return rows;
}

function renderTable() {
  const tbody = $("#table tbody");
  const leaf = S.path.length === 2;
  const rows = sortedRows();
  tbody.innerHTML = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    tr.dataset.kind = r.kind;
    const cells = [r.name, num(r.count), num(r.registered), pct(r.turnout_pct),
      num(r.sites_reporting) + " / " + num(r.sites_total), num(r.sites_silent)];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = c;
      if (i > 0) td.className = "num";
      td.dataset.col = ["name", "count", "registered", "turnout", "sites", "silent"][i];
      tr.appendChild(td);
    });
    if (leaf || !S.meta || S.meta.access !== "token") tr.className = "leaf";
    else tr.addEventListener("click", () => drill(r));
    tbody.appendChild(tr);
  }
  document.querySelectorAll("#table th").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === S.sort.key);
    th.classList.toggle("asc", th.dataset.key === S.sort.key && S.sort.asc);
  });
  const crumbs = $("#crumbs");
  crumbs.innerHTML = "";
  const parts = [{ name: t("national") }].concat(S.path);
  parts.forEach((p, i) => {
    if (i > 0) crumbs.appendChild(document.createTextNode(" › "));
    const a = document.createElement(i < parts.length - 1 ? "a" : "span");
    a.textContent = p.name;
    if (i < parts.length - 1) a.addEventListener("click", () => { S.path = S.path.slice(0, i); reloadScope(); });
    crumbs.appendChild(a);
  });
  $("#back").style.visibility = S.path.length ? "visible" : "hidden";
  const q = "scope=" + encodeURIComponent(scope()) + "&session=" + sessionParam();
  $("#export-totals").href = "/export/totals.csv?" + q;
  $("#export-sites").href = "/export/sites.csv?" + q;
  $("#export-silent").href = "/export/silent.csv?scope=" + encodeURIComponent(scope());
  $("#export-corrections").href = "/export/corrections.csv";
}

function render() { renderHero(); renderTable(); }

// A live frame: national totals and, in registry order, [count, registered, reporting, total, over].
function applyFrame(f) {
  S.national = f.national;
  S.lastFrame = f.unix_ms;
  f.provinces.forEach((p, i) => {
    const row = S.provinces[i];
    if (!row) return;
    [row.count, row.registered, row.sites_reporting, row.sites_total, row.sites_over_capacity] = p;
    row.sites_silent = row.sites_total - row.sites_reporting;
    row.turnout_pct = row.registered > 0 ? (100 * row.count) / row.registered : 0;
  });
  text($("#updated"), clock(f.unix_ms));
  if (S.path.length === 0) { S.rows = S.provinces; render(); } else { renderHero(); throttledScope(); }
  throttledExtras();
}

function connect() {
  if (S.source) S.source.close();
  const es = new EventSource("/api/live?session=" + sessionParam());
  S.source = es;
  es.addEventListener("totals", (e) => {
    if (S.source !== es) return;
    setStatus("live");
    applyFrame(JSON.parse(e.data));
  });
  es.onopen = () => { if (S.source === es) resync(); };
  es.onerror = () => {
    if (S.source !== es) return;
    setStatus("reconnecting");
    // The browser retries by itself; if it gave up (CLOSED), start again.
    if (es.readyState === EventSource.CLOSED) setTimeout(() => { if (S.source === es) connect(); }, 1000);
  };
}

// Names and registered figures from a snapshot; the live frames then carry the numbers.
async function resync() {
  try {
    const b = await api("/api/breakdown?scope=national&order=id&session=" + sessionParam());
    S.national = b.totals;
    S.provinces = b.children;
    if (S.path.length === 0) S.rows = S.provinces;
    render();
    await reloadScope();
    refreshExtras();
  } catch (e) { console.warn(e); }
}

async function reloadScope() {
  if (S.path.length === 0) { S.rows = S.provinces; render(); refreshCurve(); return; }
  const b = await api("/api/breakdown?order=id&scope=" + encodeURIComponent(scope()) + "&session=" + sessionParam());
  S.rows = b.children;
  render();
  refreshCurve();
}

function throttle(fn, ms) {
  let last = 0, timer = null;
  return () => {
    const wait = last + ms - Date.now();
    if (wait <= 0) { last = Date.now(); fn(); }
    else if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}
const throttledScope = throttle(() => reloadScope().catch(console.warn), 1000);
const throttledExtras = throttle(refreshExtras, 5000);

function drill(r) {
  if (S.path.length >= 2) return;
  S.path.push({ kind: r.kind, id: r.id, name: r.name });
  S.sort = { key: null, asc: true };
  reloadScope().catch(console.warn);
}

async function refreshCurve() {
  const prov = S.path.length ? S.path[0] : null;
  const sc = prov ? "province:" + prov.id : "national";
  text($("#curve-scope"), prov ? prov.name : t("national"));
  try {
    const c = await api("/api/curve?scope=" + encodeURIComponent(sc) + "&session=" + sessionParam());
    drawCurve(c.points);
  } catch (e) { console.warn(e); }
}

function drawCurve(points) {
  const svg = $("#curve");
  const W = 800, H = 220, pad = 6;
  if (!points.length) { svg.innerHTML = ""; return; }
  const x0 = points[0].unix_ms, x1 = Math.max(points[points.length - 1].unix_ms, x0 + 1);
  const ymax = Math.max(1, ...points.map((p) => p.count));
  const X = (ms) => pad + ((ms - x0) / (x1 - x0)) * (W - 2 * pad);
  const Y = (v) => H - pad - (v / ymax) * (H - 2 * pad);
  const line = points.map((p) => X(p.unix_ms).toFixed(1) + "," + Y(p.count).toFixed(1)).join(" ");
  const dmax = Math.max(1, ...points.map((p) => p.delta));
  const bw = Math.min(24, Math.max(1, (W - 2 * pad) / points.length - 1));
  const bars = points.map((p) => {
    const h = (Math.max(0, p.delta) / dmax) * (H - 2 * pad) * 0.4;
    return `<rect x="${(X(p.unix_ms) - bw / 2).toFixed(1)}" y="${(H - pad - h).toFixed(1)}" width="${bw.toFixed(1)}" height="${h.toFixed(1)}" fill="#3b5b7a"/>`;
  }).join("");
  const dot = points.length === 1 ? `<circle cx="${X(x0).toFixed(1)}" cy="${Y(points[0].count).toFixed(1)}" r="4" fill="#f2c14e"/>` : "";
  svg.innerHTML = bars + dot + `<polyline points="${line}" fill="none" stroke="#f2c14e" stroke-width="2.5" vector-effect="non-scaling-stroke"/>`;
  text($("#curve-start"), clock(x0));
  text($("#curve-max"), num(ymax));
  text($("#curve-end"), clock(points[points.length - 1].unix_ms));
}

async function refreshExtras() {
  refreshCurve();
  if (!S.meta || S.meta.access !== "token") return;
  try {
    const sc = encodeURIComponent(scope() === "national" || S.path.length === 0 ? "national" : scope());
    const s = await api("/api/silent?limit=200&scope=" + sc);
    text($("#silent-total"), num(s.total_silent));
    const hasContact = s.sites.some((x) => x.contact);
    document.querySelectorAll("#silent .contact").forEach((el) => { el.style.display = hasContact ? "" : "none"; });
    $("#silent tbody").innerHTML = "";
    for (const x of s.sites) {
      const tr = document.createElement("tr");
      for (const [v, cls] of [[x.site_id + " " + x.name, ""], [x.province, ""], [clock(x.last_seen_unix_ms), ""], [x.contact, "contact"]]) {
        const td = document.createElement("td"); td.textContent = v; if (cls) { td.className = cls; td.style.display = hasContact ? "" : "none"; } tr.appendChild(td);
      }
      $("#silent tbody").appendChild(tr);
    }
    const c = await api("/api/corrections?limit=100");
    $("#corrections tbody").innerHTML = "";
    for (const x of c.corrections) {
      const tr = document.createElement("tr");
      for (const [v, cls] of [[clock(x.unix_ms), ""], [x.site_id + " #" + x.desk, ""], [String(x.session), ""],
        [num(x.previous_count) + " → " + num(x.count), "num"], [x.reason, ""]]) {
        const td = document.createElement("td"); td.textContent = v; if (cls) td.className = cls; tr.appendChild(td);
      }
      $("#corrections tbody").appendChild(tr);
    }
  } catch (e) { console.warn(e); }
}

async function start() {
  S.meta = await api("/api/meta");
  document.body.classList.toggle("public", S.meta.access !== "token");
  const want = params.get("session");
  S.session = want || (S.meta.current_session != null ? S.meta.current_session : "all");
  if (params.get("big") === "1") document.body.classList.add("big");
  $("#session").addEventListener("change", (e) => {
    S.session = e.target.value;
    connect();
  });
  $("#lang").addEventListener("click", () => {
    S.lang = S.lang === "vi" ? "en" : "vi";
    localStorage.setItem("headcount.lang", S.lang);
    translate();
  });
  $("#bigmode").addEventListener("click", () => { document.body.classList.toggle("big"); translate(); });
  $("#back").addEventListener("click", () => { S.path.pop(); reloadScope().catch(console.warn); });
  $("#laggards").addEventListener("click", () => { S.sort = { key: "turnout_pct", asc: true }; renderTable(); });
  document.querySelectorAll("#table th").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.key;
    S.sort = { key, asc: S.sort.key === key ? !S.sort.asc : key === "name" };
    renderTable();
  }));
  translate();
  connect();
}

// The aggregator may be down when the page opens: show it, and try again.
start().catch((e) => { console.error(e); setStatus("reconnecting"); setTimeout(() => location.reload(), 3000); });
