#!/usr/bin/env node
// What a radiologist sees of the node's results in OHIF: Debian's chromium, headless, driven
// by puppeteer-core, opens each study's SR, source image and Secondary Capture in OHIF's
// viewport, writes a screenshot of each, and prints one JSON report on stdout.
//
//   node ohif_check.mjs spec.json
//
// spec.json: {"origin": "http://127.0.0.1:PORT", "out": "folder for the screenshots",
//   "studies": [{"name": "...", "study": "<StudyInstanceUID>", "source": "<series UID>",
//                "sr": "<series UID>", "sc": "<series UID>",
//                "regions": [[[x, y], ...], ...]}]}
// "regions" are the SR's polylines in the source image's pixels (column, row): each must
// be among OHIF's annotations at that place, and drawn: coloured pixels along it in the SR
// view, none in the view of the source image alone.
//
// The report lists, per study and view, the page errors and console errors, the pixel
// statistics of the viewport (black or not), OHIF's annotations and the marks found,
// "problems": every reason a viewer would not show the results, and "notes": what OHIF does
// with the source image itself (drawn black, say), which no result can change. Exit status 0 whether or
// not there are problems (the caller judges); 2 when the check itself could not run.

import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const WIDTH = 1280;
const HEIGHT = 900;
const VIEW_TIMEOUT_MS = Number(process.env.OHIF_VIEW_TIMEOUT_MS || 30000);
// WebGL in software, on purpose: SwiftShader through ANGLE is the same on every machine
// without a GPU (Chromium no longer falls back to it on its own).
const CHROMIUM_FLAGS = [
  `--window-size=${WIDTH},${HEIGHT}`,
  '--use-gl=angle',
  '--use-angle=swiftshader',
  '--enable-unsafe-swiftshader',
  '--ignore-gpu-blocklist',
  '--disable-dev-shm-usage',
  '--no-first-run',
  '--hide-scrollbars',
  '--mute-audio',
];
// What the console says when OHIF breaks: React's error boundary, a TypeError, an uncaught
// error; not OHIF's echo of the same error into its notification cache.
const BREAKAGE = /Error Boundary|TypeError|Uncaught/;
const ECHO = /^(Stored notification in cache|Prevented duplicate notification)/;

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// ---- in the page ------------------------------------------------------------------------

// What OHIF shows now: the display sets in its viewports and whether cornerstone has an image up.
function pageState() {
  const state = { displayed: [], rendered: false, brokenPage: /Something went wrong/.test(document.body?.innerText || '') };
  const services = window.services;
  if (services?.viewportGridService && services?.displaySetService) {
    const viewports = services.viewportGridService.getState().viewports;
    const entries = viewports instanceof Map ? [...viewports.values()] : Object.values(viewports || {});
    for (const viewport of entries) {
      for (const uid of viewport.displaySetInstanceUIDs || []) {
        const set = services.displaySetService.getDisplaySetByUID(uid);
        if (set) state.displayed.push({ modality: set.Modality, series: set.SeriesInstanceUID, description: set.SeriesDescription });
      }
    }
  }
  const cs = window.cornerstone;
  for (const engine of cs?.getRenderingEngines?.() || []) {
    for (const viewport of engine.getViewports()) {
      const imageId = viewport.getCurrentImageId?.();
      if (imageId && cs.cache.getImage(imageId)) state.rendered = true;
    }
  }
  state.annotations = window.cornerstoneTools?.annotation?.state?.getAllAnnotations?.().length || 0;
  return state;
}

// The cornerstone viewport on screen (the largest), its rectangle, and what it holds.
function mainViewport() {
  const cs = window.cornerstone;
  let best = null;
  for (const engine of cs?.getRenderingEngines?.() || []) {
    for (const viewport of engine.getViewports()) {
      const rect = viewport.element.getBoundingClientRect();
      if (!best || rect.width * rect.height > best.rect.width * best.rect.height) best = { viewport, rect };
    }
  }
  return best;
}

function viewportFacts() {
  const best = mainViewport();
  if (!best) return null;
  const { viewport, rect } = best;
  const imageId = viewport.getCurrentImageId?.();
  const cs = window.cornerstone;
  const plane = imageId ? cs.metaData.get('imagePlaneModule', imageId) : null;
  const cine = window.services?.cineService?.getState?.();
  const labels = [...viewport.element.querySelectorAll('svg text')].map(t => t.textContent.trim()).filter(Boolean);
  let renderer = null;
  try {
    const gl = document.createElement('canvas').getContext('webgl2');
    const info = gl && gl.getExtension('WEBGL_debug_renderer_info');
    renderer = gl ? gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER) : 'no WebGL2';
  } catch (error) {
    renderer = String(error);
  }
  return {
    rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height },
    imageId,
    pixelSpacing: plane?.pixelSpacing ?? null,
    cpuRendering: cs.getShouldUseCPURendering?.() ?? null,
    renderer,
    labels: [...new Set(labels)],
    cine: cine ? { enabled: Boolean(cine.isCineEnabled), playing: Object.values(cine.cines || {}).some(c => c.isPlaying) } : null,
    cineControls: Boolean(document.querySelector('[class*="cine" i], [data-cy*="cine" i]')),
  };
}

// OHIF's annotations, with their points in the source image's pixels.
function annotationFacts() {
  const cs = window.cornerstone;
  const all = window.cornerstoneTools?.annotation?.state?.getAllAnnotations?.() || [];
  const seen = new Set();
  const out = [];
  for (const annotation of all) {
    const imageId = annotation.metadata?.referencedImageId;
    const world = annotation.data?.handles?.points || [];
    const key = JSON.stringify([imageId, world]);
    if (seen.has(key)) continue; // OHIF keeps a copy per hydration of the same SR
    seen.add(key);
    let pixels = null;
    try {
      pixels = imageId ? world.map(point => Array.from(cs.utilities.worldToImageCoords(imageId, point))) : null;
    } catch (error) {
      pixels = String(error);
    }
    out.push({
      tool: annotation.metadata?.toolName,
      label: annotation.data?.label ?? null,
      imageId,
      world,
      pixels,
      finite: world.flat().every(Number.isFinite),
    });
  }
  return out;
}

// Canvas positions (in the viewport's rectangle) of points in the source image's pixels,
// and whether each is really visible there (no dialog or panel on top).
function project(polylines) {
  const best = mainViewport();
  if (!best) return null;
  const { viewport, rect } = best;
  const cs = window.cornerstone;
  const imageId = viewport.getCurrentImageId();
  return polylines.map(line => line.map(([x, y]) => {
    const canvas = viewport.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, [x, y]));
    const inside = Number.isFinite(canvas[0]) && Number.isFinite(canvas[1]) && canvas[0] >= 0 && canvas[1] >= 0 && canvas[0] < rect.width && canvas[1] < rect.height;
    const top = inside ? document.elementFromPoint(rect.x + canvas[0], rect.y + canvas[1]) : null;
    return { x: canvas[0], y: canvas[1], visible: Boolean(top && viewport.element.contains(top)) };
  }));
}

// Pixel statistics of the viewport's rectangle in a PNG of the page, and how much colour lies
// along each polyline.
async function pixelFacts(png, rect, lines) {
  const bitmap = await createImageBitmap(await (await fetch(`data:image/png;base64,${png}`)).blob());
  const canvas = new OffscreenCanvas(Math.floor(rect.width), Math.floor(rect.height));
  const context = canvas.getContext('2d');
  context.drawImage(bitmap, -Math.round(rect.x), -Math.round(rect.y));
  const { data, width, height } = context.getImageData(0, 0, canvas.width, canvas.height);
  const coloured = (x, y) => {
    const i = 4 * (y * width + x);
    return Math.max(data[i], data[i + 1], data[i + 2]) - Math.min(data[i], data[i + 1], data[i + 2]) > 80;
  };
  let sum = 0;
  let squares = 0;
  let lit = 0;
  let colour = 0;
  let red = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = 4 * (y * width + x);
      const luminance = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
      sum += luminance;
      squares += luminance * luminance;
      if (luminance > 16) lit++;
      if (coloured(x, y)) colour++;
      if (data[i] > 180 && data[i + 1] < 120 && data[i + 2] < 120) red++;
    }
  }
  const n = width * height;
  const mean = sum / n;
  const marks = (lines || []).map(line => {
    let samples = 0;
    let hits = 0;
    for (let k = 0; k + 1 < line.length; k++) {
      const [a, b] = [line[k], line[k + 1]];
      const steps = Math.max(1, Math.ceil(Math.hypot(b.x - a.x, b.y - a.y) / 4));
      for (let s = 0; s < steps; s++) {
        const t = s / steps;
        const [x, y] = [Math.round(a.x + t * (b.x - a.x)), Math.round(a.y + t * (b.y - a.y))];
        if (!(a.visible && b.visible) || x < 3 || y < 3 || x >= width - 3 || y >= height - 3) continue;
        samples++;
        let hit = false;
        for (let dy = -3; dy <= 3 && !hit; dy++) for (let dx = -3; dx <= 3 && !hit; dx++) hit = coloured(x + dx, y + dy);
        if (hit) hits++;
      }
    }
    return { samples, coloured: samples ? hits / samples : null };
  });
  return {
    width,
    height,
    mean: Math.round(mean * 10) / 10,
    std: Math.round(Math.sqrt(Math.max(0, squares / n - mean * mean)) * 10) / 10,
    lit: Math.round((lit / n) * 1000) / 1000,
    coloured: Math.round((colour / n) * 10000) / 10000,
    red: Math.round((red / n) * 10000) / 10000,
    marks,
  };
}

// ---- driving the browser ----------------------------------------------------------------

async function openView(browser, origin, study, series, kind, screenshot, lines) {
  const started = Date.now();
  const page = await browser.newPage();
  await page.setViewport({ width: WIDTH, height: HEIGHT });
  const view = { kind, series, url: `${origin}/viewer?StudyInstanceUIDs=${study}&initialSeriesInstanceUID=${series}`, errors: [], console_errors: [] };
  page.on('pageerror', error => view.errors.push(`page error: ${error.message}`));
  page.on('console', message => {
    const text = message.text();
    const line = `console ${message.type()}: ${text.slice(0, 400)}`;
    if (BREAKAGE.test(text) && !ECHO.test(text)) {
      if (!view.errors.includes(line)) view.errors.push(line);
    } else if (message.type() === 'error') view.console_errors.push(text.slice(0, 400));
  });
  // OHIF's first-visit tour would cover the viewport.
  await page.evaluateOnNewDocument(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
  try {
    await page.goto(view.url, { waitUntil: 'networkidle0', timeout: VIEW_TIMEOUT_MS });
    await page.addScriptTag({ content: `${mainViewport}` }); // the others call it in the page
    let state = await page.evaluate(pageState);
    const deadline = Date.now() + VIEW_TIMEOUT_MS;
    const shown = s => s.displayed.some(d => d.series === series) && s.rendered;
    while (Date.now() < deadline && !state.brokenPage && !view.errors.some(e => /Error Boundary/.test(e))) {
      if (shown(state) && (kind !== 'sr' || !lines?.length || state.annotations > 0)) break;
      await sleep(250);
      state = await page.evaluate(pageState);
    }
    // Let the last frame and the annotation layer draw.
    await page.waitForNetworkIdle({ idleTime: 500, timeout: 10000 }).catch(() => {});
    await page.evaluate(() => new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve))));
    await sleep(1000);
    state = await page.evaluate(pageState);
    view.displayed = state.displayed;
    view.shown = shown(state);
    view.broken_page = state.brokenPage;
    view.viewport = await page.evaluate(viewportFacts);
    if (kind === 'sr') view.annotations = await page.evaluate(annotationFacts);
    const projected = lines?.length && view.viewport ? await page.evaluate(project, lines) : null;
    // One screenshot of the page as it is: a clipped one would resize the page and OHIF would
    // lay the viewport out again.
    const png = await page.screenshot({ encoding: 'base64', captureBeyondViewport: false });
    fs.writeFileSync(screenshot, Buffer.from(png, 'base64'));
    view.screenshot = screenshot;
    if (view.viewport) view.pixels = await page.evaluate(pixelFacts, png, view.viewport.rect, projected);
  } catch (error) {
    view.errors.push(`check: ${error.message}`);
  } finally {
    view.seconds = Math.round((Date.now() - started) / 100) / 10;
    await page.close();
  }
  return view;
}

function near(a, b, tolerance) {
  return a.length === b.length && a.every((p, i) => Math.abs(p[0] - b[i][0]) <= tolerance && Math.abs(p[1] - b[i][1]) <= tolerance);
}

// Problems: what keeps a radiologist from seeing the node's results. Notes: what OHIF does
// with the source image itself, which no result can change (a source drawn black, so the
// regions on it cannot be seen either).
function judge(entry) {
  const problems = [];
  const notes = [];
  const { sr, source, sc } = entry.views;
  const regions = entry.regions || [];
  const black = view => view.pixels && (view.pixels.lit < 0.05 || view.pixels.std < 2);
  const sourceBlack = black(source) && !source.errors.length;
  for (const view of [sr, source, sc]) {
    const name = `${view.kind} view`;
    for (const error of view.errors) problems.push(`${name}: ${error}`);
    if (view.broken_page) problems.push(`${name}: OHIF shows "Something went wrong"`);
    if (!view.shown) {
      const held = (view.displayed || []).some(d => d.series === view.series);
      problems.push(held ? `${name}: OHIF has series ${view.series} in its viewport but draws no image` : `${name}: series ${view.series} is not in OHIF's viewport (it shows ${JSON.stringify(view.displayed || [])})`);
    }
    if (!view.pixels) problems.push(`${name}: no viewport to look at`);
    else if (black(view)) {
      const stats = JSON.stringify({ mean: view.pixels.mean, std: view.pixels.std, lit: view.pixels.lit });
      if (view.kind !== 'sc' && sourceBlack) notes.push(`${name}: the source image is drawn black, with or without the SR (pixel spacing ${JSON.stringify(view.viewport?.pixelSpacing)}) ${stats}`);
      else problems.push(`${name}: the viewport is black ${stats}`);
    }
  }
  const annotations = sr.annotations || [];
  for (const a of annotations.filter(a => !a.finite)) problems.push(`sr view: annotation "${a.label}" has points that are not numbers (${JSON.stringify(a.world)})`);
  regions.forEach((region, i) => {
    const size = Math.max(...region.flat().map(Math.abs), 100);
    if (!annotations.some(a => Array.isArray(a.pixels) && near(a.pixels.map(p => p.slice(0, 2)), region, Math.max(3, 0.01 * size)))) {
      problems.push(`sr view: region ${i + 1} of the SR is not among OHIF's annotations at its place`);
    }
    const drawn = sr.pixels?.marks?.[i];
    const before = source.pixels?.marks?.[i];
    if (sourceBlack) notes.push(`sr view: region ${i + 1} cannot be seen on a black image`);
    else if (!drawn || !drawn.samples) problems.push(`sr view: region ${i + 1} is nowhere on screen`);
    else if (drawn.coloured < 0.5 || (before?.coloured ?? 0) > 0.2) {
      problems.push(`sr view: region ${i + 1} is not drawn (coloured along its outline: ${drawn.coloured} with the SR, ${before?.coloured ?? 'n/a'} on the image alone)`);
    }
  });
  // The Secondary Capture has the regions burnt in, in red.
  if (regions.length && sc.pixels && source.pixels && !(sc.pixels.red > source.pixels.red + 0.001)) {
    problems.push(`sc view: no red region marks (red fraction ${sc.pixels.red}, image alone ${source.pixels.red})`);
  }
  return { problems, notes };
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  fs.mkdirSync(spec.out, { recursive: true });
  const started = Date.now();
  const args = [...CHROMIUM_FLAGS];
  if (process.getuid?.() === 0) args.push('--no-sandbox'); // Chromium's sandbox refuses root
  const browser = await puppeteer.launch({ executablePath: spec.chromium || process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args });
  const report = { chromium: await browser.version(), flags: args, studies: [], problems: [], notes: [] };
  try {
    for (const entry of spec.studies) {
      const shot = kind => path.join(spec.out, `${entry.name}_${kind}.png`);
      const lines = entry.regions || [];
      const views = {};
      views.sr = await openView(browser, spec.origin, entry.study, entry.sr, 'sr', shot('sr'), lines);
      views.source = await openView(browser, spec.origin, entry.study, entry.source, 'source', shot('source'), lines);
      views.sc = await openView(browser, spec.origin, entry.study, entry.sc, 'sc', shot('sc'), null);
      const result = { name: entry.name, study: entry.study, regions: lines, views };
      Object.assign(result, judge(result));
      report.problems.push(...result.problems.map(p => `${entry.name}: ${p}`));
      report.notes.push(...result.notes.map(n => `${entry.name}: ${n}`));
      report.studies.push(result);
    }
  } finally {
    await browser.close();
  }
  report.seconds = Math.round((Date.now() - started) / 100) / 10;
  process.stdout.write(`${JSON.stringify(report, null, 1)}\n`);
}

main().catch(error => {
  process.stderr.write(`ohif_check: ${error.stack || error}\n`);
  process.exit(2);
});
