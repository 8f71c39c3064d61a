import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

const POLL_MS = 2000;

interface IServer {
  peer_id: string;
  start: number;
  end: number;
  state: string;
  dtype?: string;
  quant_type?: string;
  throughput: number;
  cache_tokens_left: number;
  reachability?: string; // what the server announces: public, relayed (behind NAT), private, local, unknown
  relay?: boolean; // it relays for peers behind NAT
}

interface IServe {
  state: string;
  error: string | null;
  blocks: number[] | null;
  device: string;
  quant_type?: string;
  progress: string;
  requests?: number;
  throughput?: number;
  cache_used_bytes?: number;
  cache_total_bytes?: number;
}

interface IKernelState {
  pid: number;
  kernel_id?: string | null;
  connected: boolean;
  model: string | null;
  model_prefix?: string;
  num_blocks?: number;
  coverage?: number[];
  missing_blocks?: number[];
  servers?: IServer[];
  own_peer_id?: string | null;
  links?: { [peerId: string]: string | null }; // how this kernel reaches each server: direct, hole-punched, relayed
  gpu: boolean;
  serve: IServe;
}

async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'swarm', path);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    throw new Error(data.error || response.statusText);
  }
  return data as T;
}

/** How this kernel reaches a server now (direct, hole-punched, relayed), else what the server announces. */
function reach(k: IKernelState, s: IServer): string {
  return (k.links || {})[s.peer_id] || s.reachability || 'unknown';
}

function el(tag: string, cls = '', text = ''): HTMLElement {
  const node = document.createElement(tag);
  if (cls) {
    node.className = cls;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

/** Polls /swarm/state and tells its listeners. */
class SwarmModel {
  kernel: IKernelState | null = null;
  error: string | null = null;
  /** The kernel of the notebook in front: its swarm is the one shown when several kernels have one. */
  preferredKernelId: () => string | null = () => null;
  private listeners: Array<() => void> = [];
  private timer: number | null = null;

  start(): void {
    void this.poll();
    this.timer = window.setInterval(() => void this.poll(), POLL_MS);
  }

  dispose(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
    }
  }

  onChange(fn: () => void): void {
    this.listeners.push(fn);
  }

  async poll(): Promise<void> {
    try {
      const data = await requestAPI<{ kernels: IKernelState[] }>('state');
      const preferred = this.preferredKernelId();
      this.kernel =
        data.kernels.find(k => preferred !== null && k.kernel_id === preferred) ||
        data.kernels.find(k => k.connected) ||
        data.kernels[0] ||
        null;
      this.error = null;
    } catch (e) {
      this.error = String((e as Error).message || e);
    }
    this.listeners.forEach(fn => fn());
  }

  async serve(action: 'start' | 'stop'): Promise<void> {
    const body: { action: string; pid?: number } = { action };
    if (this.kernel) {
      body.pid = this.kernel.pid;
    }
    await requestAPI('serve', { method: 'POST', body: JSON.stringify(body) });
    await this.poll();
  }
}

/** The "Swarm" sidebar: coverage map, servers, serve toggle. */
class SwarmPanel extends Widget {
  private model: SwarmModel;
  private header = el('div', 'jp-SwarmPanel-header');
  private map = el('div', 'jp-SwarmPanel-map');
  private servers = el('div', 'jp-SwarmPanel-servers');
  private serveBox = el('div', 'jp-SwarmPanel-serve');
  private button = el('button', 'jp-SwarmPanel-serveButton jp-mod-styled') as HTMLButtonElement;
  private serveStatus = el('div', 'jp-SwarmPanel-serveStatus');

  constructor(model: SwarmModel) {
    super();
    this.model = model;
    this.id = 'jupyter-swarm-panel';
    this.addClass('jp-SwarmPanel');
    this.title.caption = 'Swarm';
    this.title.label = 'Swarm';
    this.node.appendChild(el('h2', 'jp-SwarmPanel-title', 'Swarm'));
    this.node.appendChild(this.header);
    this.node.appendChild(el('h3', '', 'Block coverage'));
    this.node.appendChild(this.map);
    this.node.appendChild(el('h3', '', 'Servers'));
    this.node.appendChild(this.servers);
    this.node.appendChild(el('h3', '', 'Contribute'));
    this.serveBox.appendChild(this.button);
    this.serveBox.appendChild(this.serveStatus);
    this.node.appendChild(this.serveBox);
    this.button.onclick = () => {
      const k = this.model.kernel;
      const serving = k && ['starting', 'serving'].includes(k.serve.state);
      this.button.disabled = true;
      this.model
        .serve(serving ? 'stop' : 'start')
        .catch(e => {
          this.serveStatus.textContent = String(e.message || e);
        });
    };
    model.onChange(() => this.render());
    this.render();
  }

  render(): void {
    const k = this.model.kernel;
    this.map.textContent = '';
    this.servers.textContent = '';
    if (this.model.error) {
      this.header.textContent = `Cannot reach the swarm API: ${this.model.error}`;
    } else if (!k || !k.connected) {
      this.header.textContent =
        'Not connected. In a notebook: %load_ext jupyter_swarm, then %swarm connect MODEL --peers ... (or demo --local).';
    } else {
      const online = (k.servers || []).filter(s => s.state === 'online').length;
      const missing = k.missing_blocks || [];
      this.header.textContent = `${k.model_prefix ?? k.model}: ${k.num_blocks ?? '?'} blocks, ${online} server(s) online, ${
        missing.length ? `holes at blocks ${missing.join(', ')}` : 'all blocks covered'
      }`;
      this.renderMap(k);
      this.renderServers(k);
    }
    this.renderServe(k);
  }

  private renderMap(k: IKernelState): void {
    const n = k.num_blocks || 0;
    const servers = k.servers || [];
    const top = Math.max(1, ...servers.map(s => s.throughput));
    const grid = el('div', 'jp-SwarmPanel-grid');
    // columns may shrink below their text: a narrow panel still shows every block of a big model
    grid.style.gridTemplateColumns = `90px repeat(${n}, minmax(0, 1fr))`;
    const dense = n > 16; // then only every fifth block is numbered, and counts are in the tooltips
    grid.appendChild(el('div', 'jp-SwarmPanel-label', 'block'));
    for (let b = 0; b < n; b++) {
      const label = el('div', 'jp-SwarmPanel-label jp-SwarmPanel-blockNumber', !dense || b % 5 === 0 ? String(b) : '');
      grid.appendChild(label);
    }
    for (const s of servers) {
      const own = s.peer_id === k.own_peer_id;
      grid.appendChild(el('div', 'jp-SwarmPanel-label', s.peer_id.slice(-6) + (own ? ' (you)' : '')));
      for (let b = 0; b < n; b++) {
        const cell = el('div', 'jp-SwarmPanel-cell');
        if (s.start <= b && b < s.end) {
          cell.classList.add(`jp-mod-${s.state}`);
          if (s.state === 'online') {
            cell.style.opacity = String(0.45 + 0.55 * (s.throughput / top));
          }
          cell.title =
            `${s.peer_id}\nblocks ${s.start}:${s.end}, ${s.state}, ${s.dtype ?? ''} ${s.quant_type ?? 'none'}, ` +
            `${s.throughput.toFixed(1)} steps/s, ${reach(k, s)}`;
        }
        grid.appendChild(cell);
      }
    }
    grid.appendChild(el('div', 'jp-SwarmPanel-label', 'servers'));
    (k.coverage || []).forEach((c, b) => {
      const cell = el('div', 'jp-SwarmPanel-count', dense ? '' : String(c));
      cell.classList.add(c === 0 ? 'jp-mod-hole' : 'jp-mod-covered');
      cell.dataset.block = String(b);
      cell.title = `block ${b}: ${c} server(s)`;
      grid.appendChild(cell);
    });
    this.map.appendChild(grid);
  }

  private renderServers(k: IKernelState): void {
    const table = el('table', 'jp-SwarmPanel-table');
    const head = el('tr');
    ['server', 'blocks', 'state', 'quant', 'steps/s', 'reach'].forEach(h => head.appendChild(el('th', '', h)));
    table.appendChild(head);
    for (const s of k.servers || []) {
      const row = el('tr', 'jp-SwarmPanel-server');
      const own = s.peer_id === k.own_peer_id;
      [
        s.peer_id.slice(-8) + (own ? ' (you)' : ''),
        `${s.start}:${s.end}`,
        s.state,
        s.quant_type ?? 'none',
        s.throughput.toFixed(1)
      ].forEach(v => row.appendChild(el('td', '', v)));
      const reachCell = el('td', 'jp-SwarmPanel-reach', own ? s.reachability || '' : reach(k, s));
      reachCell.title =
        `announces: ${s.reachability || 'unknown'}${s.relay ? ', relays for others' : ''}` +
        (own ? '' : `; from this kernel: ${(k.links || {})[s.peer_id] || 'not connected'}`);
      row.appendChild(reachCell);
      table.appendChild(row);
    }
    this.servers.appendChild(table);
  }

  private renderServe(k: IKernelState | null): void {
    if (!k) {
      this.button.textContent = 'Contribute this machine';
      this.button.disabled = true;
      this.serveStatus.textContent = 'Connect a notebook to a swarm to contribute.';
      return;
    }
    const s = k.serve;
    const serving = ['starting', 'serving'].includes(s.state);
    this.button.textContent = serving ? 'Stop serving' : k.gpu ? 'Contribute this GPU' : 'Contribute this machine';
    this.button.classList.toggle('jp-mod-warn', serving);
    this.button.classList.toggle('jp-mod-accept', !serving);
    this.button.disabled = s.state === 'stopping' || !k.connected;
    const blocks = s.blocks ? `blocks ${s.blocks[0]}:${s.blocks[1]}` : '';
    const text: { [key: string]: string } = {
      idle: 'Not serving.',
      starting: `Starting ${blocks}: ${s.progress}...`,
      serving:
        `Serving ${blocks} (${s.quant_type ?? 'none'}) on ${s.device}: ${s.requests ?? 0} requests, ` +
        `${(s.throughput ?? 0).toFixed(1)} steps/s.`,
      stopping: 'Stopping...',
      error: `Could not serve: ${s.error}`
    };
    this.serveStatus.textContent = text[s.state] ?? s.state;
    this.serveStatus.classList.toggle('jp-mod-error', s.state === 'error');
  }
}

/** Status-bar item: connection state. */
class SwarmStatus extends Widget {
  constructor(model: SwarmModel) {
    super();
    this.addClass('jp-SwarmStatus');
    this.node.title = 'jupyter-swarm: click to open the Swarm panel';
    model.onChange(() => {
      const k = model.kernel;
      let text = 'Swarm: not connected';
      if (model.error) {
        text = 'Swarm: API unavailable';
      } else if (k && k.connected) {
        const online = (k.servers || []).filter(s => s.state === 'online').length;
        const holes = (k.missing_blocks || []).length;
        text = `Swarm: ${k.model_prefix ?? k.model} · ${online} server${online === 1 ? '' : 's'} · ${
          holes ? `${holes} missing block${holes === 1 ? '' : 's'}` : 'covered'
        }${['starting', 'serving'].includes(k.serve.state) ? ` · ${k.serve.state}` : ''}`;
      }
      this.node.textContent = text;
      this.node.dataset.connected = String(!!(k && k.connected));
    });
    this.node.textContent = 'Swarm: …';
  }
}

const SHOW_PANEL = 'jupyter-swarm:show-panel';

/**
 * Works in JupyterLab and in Notebook 7: it needs only the application shell (both have a left area), and uses
 * the status bar (Lab only), the notebook tracker and the command palette when they are there.
 */
const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-swarm-labextension:plugin',
  description: 'Swarm sidebar panel and status-bar item for jupyter-swarm (JupyterLab and Notebook 7)',
  autoStart: true,
  optional: [IStatusBar, INotebookTracker, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    notebooks: INotebookTracker | null,
    palette: ICommandPalette | null
  ) => {
    const model = new SwarmModel();
    if (notebooks) {
      model.preferredKernelId = () => notebooks.currentWidget?.sessionContext.session?.kernel?.id ?? null;
      notebooks.currentChanged.connect(() => void model.poll());
    }
    const panel = new SwarmPanel(model);
    app.shell.add(panel, 'left', { rank: 900 });
    app.commands.addCommand(SHOW_PANEL, {
      label: 'Show the Swarm panel',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: SHOW_PANEL, category: 'Swarm' });
    }
    if (statusBar) {
      const item = new SwarmStatus(model);
      item.node.onclick = () => app.shell.activateById(panel.id);
      statusBar.registerStatusItem('jupyter-swarm-labextension:status', {
        item,
        align: 'left',
        rank: 10
      });
    }
    model.start();
  }
};

export default plugin;
