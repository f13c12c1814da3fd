import MiniCPMVCore
import PhotosUI
import SwiftUI

/// One screen: bundle status, photo (library or camera), question (English or Chinese), streamed
/// answer with TTFT and tokens/s, Benchmark, and the compute-unit choice per package.
struct ContentView: View {
    @EnvironmentObject var controller: ChatController
    @State private var question = "What is in this picture?"
    @State private var pickerItem: PhotosPickerItem?
    @State private var showCamera = false

    var body: some View {
        NavigationStack {
            ScrollView {
                VStack(alignment: .leading, spacing: 14) {
                    Text(controller.status).font(.footnote).foregroundStyle(.secondary)
                    photoRow
                    if let image = controller.image {
                        Text("\(controller.imageName): \(image.width)×\(image.height)").font(.caption)
                    }
                    TextField("Ask about the photo (English or 中文)", text: $question, axis: .vertical)
                        .textFieldStyle(.roundedBorder)
                    HStack {
                        Button("Ask") { controller.ask(question) }
                            .buttonStyle(.borderedProminent)
                            .disabled(!controller.ready || controller.busy)
                        Button("Benchmark") { controller.benchmark() }
                            .disabled(!controller.ready || controller.busy)
                        Spacer()
                        if controller.busy { ProgressView() }
                    }
                    Text(controller.answer).textSelection(.enabled).frame(maxWidth: .infinity, alignment: .leading)
                    if !controller.stats.isEmpty {
                        Text(controller.stats).font(.caption.monospacedDigit())
                    }
                    computeUnits
                }
                .padding()
            }
            .navigationTitle("MiniCPM-V")
            .toolbar {
                Button("Reload") { controller.loadBundle() }.disabled(controller.busy)
            }
        }
        .onAppear { controller.loadBundle() }
        .onChange(of: pickerItem) { _, item in
            guard let item else { return }
            Task {
                if let data = try? await item.loadTransferable(type: Data.self) {
                    controller.setImage(data: data, name: item.itemIdentifier ?? "photo")
                }
            }
        }
        .sheet(isPresented: $showCamera) {
            CameraPicker { image in controller.setImage(capture: image) }
        }
    }

    private var photoRow: some View {
        HStack {
            PhotosPicker(selection: $pickerItem, matching: .images) {
                Label("Photo", systemImage: "photo")
            }
            if UIImagePickerController.isSourceTypeAvailable(.camera) {
                Button {
                    showCamera = true
                } label: {
                    Label("Camera", systemImage: "camera")
                }
            }
        }
    }

    private var computeUnits: some View {
        DisclosureGroup("Compute units") {
            Picker("Vision", selection: $controller.computePlan.vision) { unitOptions }
            Picker("Decoder", selection: $controller.computePlan.decoder) { unitOptions }
            Text(ComputePlan.reasons["vision"] ?? "").font(.caption2)
            Text("Changes apply on Reload.").font(.caption2)
        }
    }

    private var unitOptions: some View {
        ForEach(ComputePlan.Units.allCases, id: \.self) { Text($0.rawValue).tag($0) }
    }
}

/// The camera, through UIImagePickerController (the app asks for nothing else).
struct CameraPicker: UIViewControllerRepresentable {
    let onImage: (UIImage) -> Void
    @Environment(\.dismiss) private var dismiss

    func makeUIViewController(context: Context) -> UIImagePickerController {
        let picker = UIImagePickerController()
        picker.sourceType = .camera
        picker.delegate = context.coordinator
        return picker
    }

    func updateUIViewController(_ controller: UIImagePickerController, context: Context) {}

    func makeCoordinator() -> Coordinator { Coordinator(self) }

    final class Coordinator: NSObject, UIImagePickerControllerDelegate, UINavigationControllerDelegate {
        let parent: CameraPicker
        init(_ parent: CameraPicker) { self.parent = parent }

        func imagePickerController(
            _ picker: UIImagePickerController,
            didFinishPickingMediaWithInfo info: [UIImagePickerController.InfoKey: Any]
        ) {
            if let image = info[.originalImage] as? UIImage {
                parent.onImage(image)
            }
            parent.dismiss()
        }

        func imagePickerControllerDidCancel(_ picker: UIImagePickerController) {
            parent.dismiss()
        }
    }
}
