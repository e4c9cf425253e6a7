// The status bar item: the server's `codelm/status` state, shown only once the client has started.
import * as vscode from 'vscode';

export const STATUS_NOTIFICATION = 'codelm/status';

/** States of `codelm/status` (lsp/daemon_link.py), plus the client's own. */
export type State = 'starting' | 'loading' | 'ready' | 'busy' | 'error' | 'disabled' | 'stopped';

const ICONS: Record<State, string> = {
  starting: '$(loading~spin)',
  loading: '$(loading~spin)',
  ready: '$(check)',
  busy: '$(watch)',
  error: '$(error)',
  disabled: '$(circle-slash)',
  stopped: '$(debug-stop)',
};

export class StatusItem implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;
  private clientRunning = false;
  private shown = '';
  private server: { state: State; message: string } = { state: 'loading', message: '' };

  constructor(menuCommand: string) {
    this.item = vscode.window.createStatusBarItem('codelm.status', vscode.StatusBarAlignment.Right, 100);
    this.item.name = 'codelm';
    this.item.command = menuCommand;
    this.starting();
    this.item.show();
  }

  /** The client is (re)starting: server states are not shown until `started`. */
  starting(): void {
    this.clientRunning = false;
    this.server = { state: 'loading', message: '' };
    this.render('starting', 'Starting codelm-lsp');
  }

  started(): void {
    this.clientRunning = true;
    this.render(this.server.state, this.server.message);
  }

  /** A `codelm/status` notification. */
  serverStatus(state: string, message: string): void {
    this.server = { state: isState(state) ? state : 'error', message };
    if (this.clientRunning) {
      this.render(this.server.state, message);
    }
  }

  /** The client stopped or could not start. */
  failed(state: 'error' | 'stopped', message: string): void {
    this.clientRunning = false;
    this.render(state, message);
  }

  /** `codelm: ready (message)`, for the menu's title. */
  get summary(): string {
    return this.shown;
  }

  private render(state: State, message: string): void {
    this.shown = message ? `codelm: ${state} (${message})` : `codelm: ${state}`;
    this.item.text = `${ICONS[state]} codelm: ${state}`;
    this.item.tooltip = message ? `codelm: ${message}` : 'codelm';
    this.item.backgroundColor =
      state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  }

  dispose(): void {
    this.item.dispose();
  }
}

function isState(state: string): state is State {
  return state in ICONS;
}
