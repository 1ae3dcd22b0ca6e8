'use strict';
// The page of `hatnet serve`. It talks to the server only through the JSON API (api/runs, api/predict,
// api/attention) and draws every result itself on canvases, in the image's own pixel coordinates.

const $ = (id) => document.getElementById(id);
const VIEW_SIZE = [640, 520];   // the largest the image is shown, in CSS pixels
const PANEL_SIZE = 300;         // the side of an attention panel
const MASK_OPACITY = 0.45;      // of the detection masks, as `hatnet det predict` draws them
// the 'inferno' colour map of `hatnet attention`, at five stops
const INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

const state = {
  runs: new Map(),   // name -> its entry of api/runs
  file: null,        // the chosen image file
  picture: null,     // that image decoded by the browser, for drawing
  pictureUrl: null,
  result: null,      // the answer of api/predict
  masks: [],         // its masks decoded: segmentation one, detection one per detection (or null)
  attention: null,   // the answer of api/attention and its model input decoded
  query: null,       // {x, y} in model-input pixels; null: the centre
  predictions: 0,    // requests made: an answer to an older one than the newest is dropped
  attentions: 0,
};

// ---------------------------------------------------------------------------------------------- helpers
async function api(path, fields) {
  const start = performance.now();
  let response;
  try {
    if (fields) {
      const form = new FormData();
      for (const [key, value] of Object.entries(fields)) {
        if (value !== null && value !== undefined) form.append(key, value);
      }
      response = await fetch(path, { method: 'POST', body: form });
    } else {
      response = await fetch(path);
    }
  } catch (error) {
    throw new Error(`cannot reach the server (${error.message})`);
  }
  let data = {};
  try { data = await response.json(); } catch (error) { /* not JSON: the status says what happened */ }
  if (!response.ok) {
    throw new Error(data.error || data.detail || `the server answered ${response.status} ${response.statusText}`);
  }
  return { data, ms: performance.now() - start };
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error('the browser cannot decode this image'));
    image.src = src;
  });
}

function showStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

const ms = (value) => `${Math.round(value)} ms`;
const percent = (value) => `${(100 * value).toFixed(1)} %`;
const rgb = (colour, alpha = 1) => `rgba(${colour[0]}, ${colour[1]}, ${colour[2]}, ${alpha})`;
const currentRun = () => state.runs.get($('run').value);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function swatch(colour) {
  const node = element('span', 'swatch');
  node.style.background = rgb(colour);
  return node;
}

// A canvas showing a width x height image scaled to fit maxWidth x maxHeight CSS pixels, sharp on any
// screen; its context draws in the image's pixels. Small images are enlarged without smoothing, so their
// pixels (and the class boundaries of a mask) stay sharp.
function fitCanvas(canvas, width, height, maxWidth, maxHeight) {
  const scale = Math.min(maxWidth / width, maxHeight / height);
  const ratio = window.devicePixelRatio || 1;
  canvas.style.width = `${Math.round(width * scale)}px`;
  canvas.style.height = `${Math.round(height * scale)}px`;
  canvas.width = Math.round(width * scale * ratio);
  canvas.height = Math.round(height * scale * ratio);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(scale * ratio, 0, 0, scale * ratio, 0, 0);
  ctx.imageSmoothingEnabled = scale < 1;
  return { ctx, scale };
}

function inferno(value) {
  const position = Math.min(Math.max(value, 0), 1) * (INFERNO.length - 1);
  const i = Math.min(Math.floor(position), INFERNO.length - 2);
  const t = position - i;
  return INFERNO[i].map((c, k) => Math.round(c + t * (INFERNO[i + 1][k] - c)));
}

// ------------------------------------------------------------------------------------------------- runs
async function loadRuns() {
  try {
    const { data } = await api('api/runs');
    for (const run of data.runs) {
      state.runs.set(run.name, run);
      $('run').append(new Option(`${run.name} (${run.task})`, run.name));
    }
    const { max_upload_bytes: bytes, max_pixels: pixels, formats } = data.limits;
    $('limits').textContent = `${formats.join(', ')}; up to ${Math.round(bytes / 2 ** 20)} MB and `
      + `${(pixels / 1e6).toFixed(1)} megapixels`;
    runChanged();
  } catch (error) {
    showStatus(`cannot list the runs: ${error.message}`, true);
  }
}

function runChanged() {
  const run = currentRun();
  $('run-info').textContent = `${run.model}, ${run.classes.length} classes` + (run.arch ? `, ${run.arch}` : '');
  $('block').replaceChildren(...run.attention_blocks.map((block) => new Option(block, block)));
  if (run.task === 'detection') {
    $('threshold').min = run.score_thresh;
    $('threshold').value = Math.max(run.score_thresh, 0.5);  // the default of `hatnet det predict`
  }
  state.query = null;
  if (state.file) predict();
}

// ------------------------------------------------------------------------------------------ predictions
async function choose(file) {
  if (!file) return;
  state.file = file;
  state.query = null;
  if (state.pictureUrl) URL.revokeObjectURL(state.pictureUrl);
  state.pictureUrl = URL.createObjectURL(file);
  state.picture = await loadImage(state.pictureUrl).catch(() => null);  // if not, the server says why
  await predict();
}

async function predict() {
  const run = currentRun();
  const request = ++state.predictions;
  showStatus(`${run.name}: predicting ${state.file.name} …`);
  try {
    const { data, ms: roundTrip } = await api('api/predict', { image: state.file, run: run.name });
    if (!state.picture) throw new Error(`the server read ${state.file.name}, but this browser cannot show it`);
    const masks = await decodeMasks(data);
    if (request !== state.predictions) return;
    state.result = data;
    state.masks = masks;
    renderResult();
    showStatus(`${data.run}: ${data.task} of ${data.image} in ${ms(data.latency_ms)} `
      + `(round trip ${ms(roundTrip)})`);
    if (run.attention_blocks.length) {
      requestAttention();
    } else {
      $('attention').hidden = true;
    }
  } catch (error) {
    if (request !== state.predictions) return;
    state.result = null;
    $('result').hidden = true;
    $('attention').hidden = true;
    showStatus(error.message, true);
  }
}

function decodeMasks(result) {
  if (result.task === 'segmentation') return Promise.all([loadImage(result.mask)]);
  if (result.task === 'detection') {
    return Promise.all(result.detections.map((d) => (d.mask ? loadImage(d.mask.png) : null)));
  }
  return Promise.resolve([]);
}

function renderResult() {
  const result = state.result;
  $('result').hidden = false;
  $('seg-controls').hidden = result.task !== 'segmentation';
  $('det-controls').hidden = result.task !== 'detection';
  for (const id of ['top5', 'legend']) $(id).replaceChildren();
  $('detections').tBodies[0].replaceChildren();
  if (result.task === 'classification') {
    $('details-title').textContent = `top-${result.predictions.length} classes`;
    for (const p of result.predictions) {
      const item = element('li');
      const bar = element('span', 'bar');
      const fill = element('span');
      fill.style.width = percent(p.probability).replace(' ', '');
      bar.append(fill);
      item.append(element('span', 'name', p.name), element('span', 'score', percent(p.probability)), bar);
      $('top5').append(item);
    }
  } else if (result.task === 'segmentation') {
    $('details-title').textContent = 'classes in the mask';
    for (const entry of result.legend) {
      const item = element('li');
      item.append(swatch(entry.colour), element('span', 'name', entry.name),
        element('span', 'share', percent(entry.share)));
      $('legend').append(item);
    }
  } else {
    renderDetectionList();
  }
  drawView();
}

function renderDetectionList() {
  const threshold = Number($('threshold').value);
  const shown = state.result.detections.filter((d) => d.score >= threshold);
  $('threshold-value').textContent = threshold.toFixed(2);
  $('details-title').textContent = `${shown.length} of ${state.result.detections.length} detections `
    + `scoring ${threshold.toFixed(2)} or more`;
  $('detections').tBodies[0].replaceChildren(...shown.map((d) => {
    const row = element('tr');
    const colour = element('td');
    colour.append(swatch(d.colour));
    row.append(colour, element('td', 'name', d.label), element('td', 'score', d.score.toFixed(3)));
    return row;
  }));
}

function drawView() {
  const picture = state.picture;
  const width = picture.naturalWidth;
  const height = picture.naturalHeight;
  const { ctx, scale } = fitCanvas($('view'), width, height, ...VIEW_SIZE);
  ctx.drawImage(picture, 0, 0, width, height);
  if (state.result.task === 'segmentation') {
    const opacity = Number($('opacity').value);
    $('opacity-value').textContent = opacity.toFixed(2);
    ctx.globalAlpha = opacity;
    ctx.imageSmoothingEnabled = false;  // the mask's pixels are classes: no blending between them
    ctx.drawImage(state.masks[0], 0, 0, width, height);
    ctx.globalAlpha = 1;
  } else if (state.result.task === 'detection') {
    drawDetections(ctx, 1 / scale);
  }
}

// Masks, boxes and 'label score' captions of the detections at or above the threshold; px: one CSS pixel
// in image pixels, so lines and text look the same at any image size.
function drawDetections(ctx, px) {
  const threshold = Number($('threshold').value);
  state.result.detections.forEach((d, i) => {
    if (d.score < threshold) return;
    if (state.masks[i]) {
      ctx.globalAlpha = MASK_OPACITY;
      ctx.drawImage(state.masks[i], d.mask.x, d.mask.y);
      ctx.globalAlpha = 1;
    }
    const [x, y, w, h] = d.bbox;
    ctx.lineWidth = 2 * px;
    ctx.strokeStyle = rgb(d.colour);
    ctx.strokeRect(x, y, w, h);
    const caption = `${d.label} ${d.score.toFixed(2)}`;
    ctx.font = `${12 * px}px sans-serif`;
    ctx.textBaseline = 'top';
    const textHeight = 16 * px;
    const top = y >= textHeight ? y - textHeight : y;  // above the box, or inside it at the image's top
    ctx.fillStyle = rgb(d.colour);
    ctx.fillRect(x, top, ctx.measureText(caption).width + 6 * px, textHeight);
    ctx.fillStyle = '#fff';
    ctx.fillText(caption, x + 3 * px, top + 2 * px);
  });
}

// -------------------------------------------------------------------------------------------- attention
async function requestAttention() {
  const run = currentRun();
  const request = ++state.attentions;
  $('attention').hidden = false;
  $('att-status').textContent = `block ${$('block').value}: computing …`;
  $('att-status').classList.remove('error');
  try {
    const fields = { image: state.file, run: run.name, block: $('block').value };
    if (state.query) Object.assign(fields, state.query);
    const { data, ms: roundTrip } = await api('api/attention', fields);
    const input = await loadImage(data.input);
    if (request !== state.attentions) return;
    state.attention = { data, input };
    drawAttention();
    const [rows, cols] = data.map_size;
    $('att-status').textContent = `block ${data.block}: query token (${data.query.join(', ')}) of the `
      + `${rows}×${cols} token map, ${data.heads} head${data.heads === 1 ? '' : 's'}, ${ms(data.latency_ms)} `
      + `(round trip ${ms(roundTrip)})`;
  } catch (error) {
    if (request !== state.attentions) return;
    $('att-status').textContent = error.message;
    $('att-status').classList.add('error');
  }
}

function drawAttention() {
  const { data, input } = state.attention;
  const stride = data.stride;
  const local = $('att-local').parentElement;
  local.hidden = !data.local;
  if (data.local) {
    const [top, left] = data.cell;
    const [rows, cols] = [data.local.length, data.local[0].length];
    drawPanel($('att-local'), input, data, data.local, top, left, stride, (ctx, px) => {
      ctx.strokeStyle = 'yellow';
      ctx.lineWidth = 2 * px;
      ctx.strokeRect(left * stride, top * stride, cols * stride, rows * stride);
    });
    $('cap-local').textContent = `local step: within its ${rows}×${cols}-token grid cell `
      + `(max ${maximum(data.local).toFixed(3)})`;
  }
  const [pooledRows, pooledCols] = [data.global.length, data.global[0].length];
  drawPanel($('att-global'), input, data, data.global, 0, 0, stride * data.pool);
  $('cap-global').textContent = (data.local
    ? `global step: to ${pooledRows}×${pooledCols} pooled tokens`
    : `global attention to all ${pooledRows}×${pooledCols} tokens`) + ` (max ${maximum(data.global).toFixed(3)})`;
}

const maximum = (grid) => Math.max(...grid.map((row) => Math.max(...row)));

// The model input with a heat map: grid[r][c] covers the square of side `size` pixels at token row
// top + r, column left + c; values relative to the grid's largest. The query's token is marked.
function drawPanel(canvas, input, data, grid, top, left, size, decorate) {
  const [width, height] = data.input_size;
  const { ctx, scale } = fitCanvas(canvas, width, height, PANEL_SIZE, PANEL_SIZE);
  const px = 1 / scale;
  ctx.drawImage(input, 0, 0, width, height);
  const largest = maximum(grid) || 1;
  ctx.save();
  ctx.beginPath();
  ctx.rect(0, 0, width, height);  // the last tokens of a ragged map reach past the image
  ctx.clip();
  grid.forEach((row, r) => row.forEach((value, c) => {
    ctx.fillStyle = rgb(inferno(value / largest), 0.6);
    ctx.fillRect((left + c) * size, (top + r) * size, size, size);
  }));
  ctx.restore();
  if (decorate) decorate(ctx, px);
  const [row, col] = data.query;
  const x = (col + 0.5) * data.stride;
  const y = (row + 0.5) * data.stride;
  const arm = 6 * px;
  ctx.strokeStyle = 'cyan';
  ctx.lineWidth = 2.5 * px;
  ctx.beginPath();
  ctx.moveTo(x - arm, y - arm);
  ctx.lineTo(x + arm, y + arm);
  ctx.moveTo(x + arm, y - arm);
  ctx.lineTo(x - arm, y + arm);
  ctx.stroke();
}

function pickQuery(event) {
  if (!state.attention) return;
  const [width, height] = state.attention.data.input_size;
  const canvas = event.currentTarget;  // offsetX/Y and clientWidth/Height: inside the border
  const x = Math.floor((event.offsetX / canvas.clientWidth) * width);
  const y = Math.floor((event.offsetY / canvas.clientHeight) * height);
  state.query = { x: Math.min(Math.max(x, 0), width - 1), y: Math.min(Math.max(y, 0), height - 1) };
  requestAttention();
}

// --------------------------------------------------------------------------------------------- wiring
$('file').addEventListener('change', (event) => choose(event.target.files[0]));
$('run').addEventListener('change', runChanged);
$('opacity').addEventListener('input', () => { if (state.result) drawView(); });
$('threshold').addEventListener('input', () => {
  if (state.result && state.result.task === 'detection') {
    renderDetectionList();
    drawView();
  }
});
$('block').addEventListener('change', () => { if (state.result) requestAttention(); });
$('att-local').addEventListener('click', pickQuery);
$('att-global').addEventListener('click', pickQuery);
const drop = $('drop');
drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  choose(event.dataTransfer.files[0]);
});
loadRuns();
