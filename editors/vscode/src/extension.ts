// codelm for VS Code: starts codelm-lsp and shows its inline suggestions. Editors stay thin:
// every completion decision is the server's; this file wires commands, settings and status.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  State as ClientState,
  TransportKind,
} from 'vscode-languageclient/node';
import { resolveServerPath, searchedPaths } from './serverPath';
import { LanguageLists, SECTION, serverOptions, isLanguageEnabled, toggleLanguage } from './settings';
import { STATUS_NOTIFICATION, StatusItem } from './status';

const DISMISS_COMMAND = 'codelm.dismiss'; // the server's telemetry command (codelm.accept runs on accept)
// Where the user looks: the server has the daemon read the file there before the first key.
const FOCUS_NOTIFICATION = 'codelm/didFocus';
const FOCUS_DEBOUNCE_MS = 100; // arrow keys held down send one, where the cursor stops
// The documents the server completes; notebook cells too: it syncs whole notebooks, so a cell
// is completed with the cells around it.
const SCHEMES = ['file', 'untitled', 'vscode-notebook-cell'];

interface Shown {
  uri: string;
  version: number;
}

export class Extension implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private lastShown: Shown | undefined; // our suggestion on screen, for dismiss reports
  private focusTimer: NodeJS.Timeout | undefined;
  private readonly log = vscode.window.createOutputChannel('codelm', { log: true });
  private readonly status = new StatusItem('codelm.menu');

  constructor(private readonly context: vscode.ExtensionContext) {}

  async start(): Promise<void> {
    this.status.starting();
    const command = this.serverPath();
    if (!command) {
      const message = 'codelm-lsp not found: set codelm.serverPath (see the codelm log).';
      this.log.error(`${message} Searched: ${searchedPaths('codelm-lsp', this.pathContext()).join(', ')}`);
      this.status.failed('error', message);
      return;
    }
    this.log.info(`starting ${command}`);
    const client = this.createClient(command);
    this.client = client;
    client.onNotification(STATUS_NOTIFICATION, (p: { state: string; message: string }) => {
      this.log.info(`status ${p.state}: ${p.message}`);
      this.status.serverStatus(p.state, p.message);
    });
    client.onDidChangeState(({ newState }) => {
      if (this.client !== client) {
        return; // an old client that restart() replaced
      }
      this.log.info(`client ${ClientState[newState].toLowerCase()}`);
      if (newState === ClientState.Running) {
        this.status.started();
        this.focusLater(vscode.window.activeTextEditor);
      } else if (newState === ClientState.Stopped) {
        this.status.failed('stopped', 'codelm-lsp stopped; click to restart');
      } else {
        this.status.starting(); // also when the client restarts a crashed server
      }
    });
    try {
      await client.start();
    } catch (err) {
      this.log.error(`codelm-lsp did not start: ${String(err)}`);
      this.status.failed('error', `codelm-lsp did not start: ${String(err)}`);
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client?.isRunning()) {
      await client.stop();
    }
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  register(): void {
    const commands: Record<string, () => unknown> = {
      'codelm.menu': () => this.menu(),
      'codelm.toggle': () => this.setEnabled(!this.config().get<boolean>('enable')),
      'codelm.enable': () => this.setEnabled(true),
      'codelm.disable': () => this.setEnabled(false),
      'codelm.toggleLanguage': () => this.toggleActiveLanguage(),
      'codelm.trigger': () => vscode.commands.executeCommand('editor.action.inlineSuggest.trigger'),
      'codelm.dismissSuggestion': () => this.dismiss(),
      'codelm.restart': () => this.restart(),
      'codelm.showLog': () => this.log.show(),
    };
    for (const [id, run] of Object.entries(commands)) {
      this.context.subscriptions.push(vscode.commands.registerCommand(id, run));
    }
    this.context.subscriptions.push(
      vscode.workspace.onDidChangeConfiguration((e) => this.onConfigChanged(e)),
      vscode.window.onDidChangeActiveTextEditor((editor) => this.focusLater(editor)),
      vscode.window.onDidChangeTextEditorSelection((e) => this.focusLater(e.textEditor)),
    );
  }

  /** Tell the server where the cursor rests in `editor`, once it stops moving. */
  private focusLater(editor: vscode.TextEditor | undefined): void {
    clearTimeout(this.focusTimer);
    if (!editor || !SCHEMES.includes(editor.document.uri.scheme) || !editor.selection.isEmpty) {
      return;
    }
    this.focusTimer = setTimeout(() => {
      const client = this.client;
      if (!client?.isRunning() || vscode.window.activeTextEditor !== editor) {
        return;
      }
      const convert = client.code2ProtocolConverter;
      void client.sendNotification(FOCUS_NOTIFICATION, {
        textDocument: convert.asTextDocumentIdentifier(editor.document),
        position: convert.asPosition(editor.selection.active),
      });
    }, FOCUS_DEBOUNCE_MS);
  }

  private createClient(command: string): LanguageClient {
    const run = { command, args: ['--stdio'], transport: TransportKind.stdio };
    return new LanguageClient(
      'codelm',
      'codelm',
      { run, debug: run },
      {
        documentSelector: SCHEMES.map((scheme) => ({ scheme })),
        initializationOptions: serverOptions(this.config()),
        outputChannel: this.log,
        middleware: {
          provideInlineCompletionItems: async (document, position, context, token, next) => {
            const result = await next(document, position, context, token);
            const items = Array.isArray(result) ? result : result?.items;
            if (items?.length) {
              this.lastShown = { uri: document.uri.toString(), version: document.version };
            }
            return result;
          },
        },
      },
    );
  }

  private onConfigChanged(event: vscode.ConfigurationChangeEvent): void {
    if (event.affectsConfiguration(`${SECTION}.serverPath`)) {
      void this.restart();
    } else if (event.affectsConfiguration(SECTION) && this.client?.isRunning()) {
      const settings = { [SECTION]: serverOptions(this.config()) };
      void this.client.sendNotification(DidChangeConfigurationNotification.type, { settings });
    }
  }

  private async menu(): Promise<void> {
    const enabled = this.config().get<boolean>('enable') ?? true;
    const language = vscode.window.activeTextEditor?.document.languageId;
    const picks: (vscode.QuickPickItem & { command: string })[] = [
      { label: enabled ? 'Disable codelm' : 'Enable codelm', command: 'codelm.toggle' },
    ];
    if (language) {
      const on = isLanguageEnabled(this.languageLists(), language);
      picks.push({ label: `${on ? 'Disable' : 'Enable'} for ${language}`, command: 'codelm.toggleLanguage' });
    }
    picks.push(
      { label: 'Trigger suggestion', command: 'codelm.trigger' },
      { label: 'Restart language server', command: 'codelm.restart' },
      { label: 'Show log', command: 'codelm.showLog' },
    );
    const pick = await vscode.window.showQuickPick(picks, { title: this.status.summary });
    if (pick) {
      await vscode.commands.executeCommand(pick.command);
    }
  }

  private async setEnabled(enabled: boolean): Promise<void> {
    await this.config().update('enable', enabled, vscode.ConfigurationTarget.Global);
  }

  private async toggleActiveLanguage(): Promise<void> {
    const language = vscode.window.activeTextEditor?.document.languageId;
    if (!language) {
      return;
    }
    const lists = toggleLanguage(this.languageLists(), language);
    const config = this.config();
    await config.update('enabledLanguages', lists.enabledLanguages, vscode.ConfigurationTarget.Global);
    await config.update('disabledLanguages', lists.disabledLanguages, vscode.ConfigurationTarget.Global);
  }

  private async dismiss(): Promise<void> {
    await vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
    const document = vscode.window.activeTextEditor?.document;
    const shown = this.lastShown;
    this.lastShown = undefined;
    if (shown && document && shown.uri === document.uri.toString() && this.client?.isRunning()) {
      await this.client.sendRequest(ExecuteCommandRequest.type, { command: DISMISS_COMMAND, arguments: [] });
    }
  }

  private languageLists(): LanguageLists {
    const options = serverOptions(this.config());
    return { enabledLanguages: options.enabledLanguages, disabledLanguages: options.disabledLanguages };
  }

  private serverPath(): string | undefined {
    return resolveServerPath(this.pathContext());
  }

  private pathContext() {
    return {
      setting: this.config().get<string>('serverPath') ?? '',
      workspaceFolders: (vscode.workspace.workspaceFolders ?? []).map((f) => f.uri.fsPath),
      extensionPath: this.context.extensionPath,
      envPath: process.env.PATH ?? '',
      home: os.homedir(),
      platform: process.platform,
      isFile: (file: string) => fs.statSync(file, { throwIfNoEntry: false })?.isFile() ?? false,
    };
  }

  private config(): vscode.WorkspaceConfiguration {
    return vscode.workspace.getConfiguration(SECTION);
  }

  dispose(): void {
    clearTimeout(this.focusTimer);
    this.status.dispose();
    this.log.dispose();
  }
}

let extension: Extension | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  extension = new Extension(context);
  context.subscriptions.push(extension);
  extension.register();
  await extension.start();
}

export async function deactivate(): Promise<void> {
  await extension?.stop();
  extension = undefined;
}
